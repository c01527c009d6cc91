"""The typed run records write exactly the JSON teachx always wrote, and read what older teachx wrote."""

from teachx.runs.records import RunResults, StageRecord


def test_stage_record_round_trips_keys_order_and_values():
    written = {
        "method": "impactx",
        "method_options": {},
        "self_teaching": 2,
        "config_hash": "abc",
        "checkpoint": "checkpoints/best.safetensors",
        "best_epoch": 1,
        "val_acc": None,
        "test_acc": 0.5,
        "test_loss": 1.2,
        "test_confusion": [[1, 0], [0, 1]],
        "seconds": 3.0,
        "seconds_per_epoch": 1.5,
        "history": [{"epoch": 1}],
    }
    record = StageRecord.from_dict(written)
    assert record.config_hash == "abc" and record.head == {
        "method": "impactx",
        "method_options": {},
        "self_teaching": 2,
    }
    assert list(record.to_dict().items()) == list(written.items())
    older = {"backbone": "resnet", "checkpoint": "/abs/best.safetensors", "test_acc": 0.4}  # no hash, fewer keys
    assert StageRecord.from_dict(older).backbone == "resnet" and StageRecord.from_dict(older).config_hash is None
    assert "config_hash" not in StageRecord.from_dict(older).to_dict()


def test_run_results_round_trip_keys_order_and_values():
    fields = [
        "class_names", "backbone", "method", "method_options", "teacher", "teacher_backbone", "teacher_test_acc",
        "seed", "epochs", "baseline_test_acc", "method_test_acc", "baseline_val_acc", "method_val_acc",
        "baseline_seconds_per_epoch", "method_seconds_per_epoch", "map_quality", "stage_seconds", "wall_seconds",
        "device", "torch_threads",
    ]  # fmt: skip
    written = {"dataset": "d", "channels": 1, "notices": []}
    written.update({k: i for i, k in enumerate(fields)})
    written.update({"config_hash": "h", "lam": 1.0, "impactx_test_acc": 0.3, "shortcut": {"images": 3}})
    results = RunResults.from_dict(written)
    assert results.data == {"dataset": "d", "channels": 1, "notices": []} and results.extra["lam"] == 1.0
    assert list(results.to_dict().items()) == list(written.items())
    assert "world_size" not in results.to_dict() and "examples" not in results.to_dict()
