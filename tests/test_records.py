"""The typed run records write exactly the JSON teachx always wrote, and read what older teachx wrote."""

import json

from teachx.runs.records import RunResults, StageRecord, TrainResults, read_results


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


def test_train_results_write_the_data_summary_then_the_stage_record_without_its_history(tmp_path):
    data = {"dataset": "d", "channels": 1, "notices": []}
    stage = StageRecord.from_dict(
        {"backbone": "lenet5", "config_hash": "h", "checkpoint": "checkpoints/best.safetensors", "test_acc": 0.5}
        | {"history": [{"epoch": 1}]}
    )
    TrainResults(data, stage, 2.5, "h").write(tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["digest"].startswith("sha256:")
    written = read_results(tmp_path)  # verified against its digest, which it leaves out
    assert written is not None
    assert list(written) == [
        "dataset", "channels", "notices", "backbone", "config_hash", "checkpoint", "best_epoch", "val_acc",
        "test_acc", "test_loss", "test_confusion", "seconds", "seconds_per_epoch", "wall_seconds",
    ]  # fmt: skip
    assert written["config_hash"] == "h" and written["test_acc"] == 0.5 and written["wall_seconds"] == 2.5
    unbound = TrainResults(data, StageRecord.from_dict({"backbone": "lenet5"}), 1.0).to_dict()
    assert "config_hash" not in unbound and "history" not in unbound
