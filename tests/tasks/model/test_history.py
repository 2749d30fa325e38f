def test_a_new_lowest_loss_moves_the_tolerance_band():
    from tasks.model.history import kept_epoch

    rows = [{"epoch": 1, "val_loss": 0.30}, {"epoch": 2, "val_loss": 0.31}, {"epoch": 3, "val_loss": 0.10},
            {"epoch": 4, "val_loss": 0.29}]
    assert kept_epoch(rows, 0.02)["epoch"] == 3  # epoch 4 was within 0.02 of the lowest before epoch 3 only
    assert kept_epoch(rows, 0.2)["epoch"] == 4
