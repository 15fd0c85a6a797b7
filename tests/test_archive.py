"""`guard archive` (profile verified first, exit codes, what goes into the .mar) and the TorchServe
config `guard serve` writes (loopback, absolute paths, free gRPC/worker ports, token auth)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from guard.cli import main
from guard.torchserve.client import http
from guard.torchserve.config import parse_ports, read_properties, write_config


def archive_args(world, profile, export, *extra: str) -> list[str]:
    return ["archive", "--name", "demo", "--model-file", str(world.model_file), "--weights", str(world.weights),
            "--profile", str(profile), "--export-path", str(export), *extra]


def test_archive_packs_handler_profile_and_config(demo_world, demo_profile, tmp_path, capsys):
    code = main(archive_args(demo_world, demo_profile, tmp_path, "--mode", "shadow", "--batch-size", "4",
                             "--max-batch-delay", "25", "--fail-open", "--max-request-bytes", "123456"))
    assert code == 0, capsys.readouterr().err
    mar = tmp_path / "demo.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        cfg = yaml.safe_load(z.read("model-config.yaml"))
    assert {"model.py", "weights.pt", "guarded_handler.py", "guard-profile/profile.json",
            "guard-profile/tensors.safetensors", "model-config.yaml", "MAR-INF/MANIFEST.json"} <= names
    assert cfg["batchSize"] == 4 and cfg["maxBatchDelay"] == 25 and cfg["minWorkers"] == cfg["maxWorkers"] == 1
    h = cfg["handler"]
    assert h["mode"] == "shadow" and h["fail_open"] is True and h["max_request_bytes"] == 123456
    assert h["profile"] == "guard-profile" and len(h["model_sha256"]) == 64
    assert "wrote" in capsys.readouterr().out


def test_archive_refuses_an_existing_file_without_force(demo_world, demo_profile, tmp_path, capsys):
    assert main(archive_args(demo_world, demo_profile, tmp_path)) == 0
    assert main(archive_args(demo_world, demo_profile, tmp_path)) == 2
    assert "--force" in capsys.readouterr().err
    assert main(archive_args(demo_world, demo_profile, tmp_path, "--force")) == 0


def test_archive_exits_3_when_the_profile_belongs_to_another_model(demo_world, demo_profile, tmp_path, capsys):
    state = torch.load(demo_world.weights, weights_only=True)
    key = next(iter(state))
    state[key] = state[key] * 1.01
    other = tmp_path / "other.pt"
    torch.save(state, other)
    args = archive_args(demo_world, demo_profile, tmp_path / "out")
    args[args.index("--weights") + 1] = str(other)
    assert main(args) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rescan" in err
    assert not (tmp_path / "out" / "demo.mar").exists()


@pytest.mark.parametrize("change, words", [(("--name", "bad/name"), "--name"),
                                           (("--profile", "/nonexistent"), "not found")])
def test_archive_bad_inputs_exit_2(demo_world, demo_profile, tmp_path, capsys, change, words):
    args = archive_args(demo_world, demo_profile, tmp_path)
    args[args.index(change[0]) + 1] = change[1]
    assert main(args) == 2
    assert words in capsys.readouterr().err


def test_serve_config_is_loopback_with_absolute_paths_and_free_side_ports(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    cfg = write_config(tmp_path, model_store=store, load_models="demo=demo.mar", ports=(18080, 18081, 18082),
                          token_auth=True)
    props = read_properties(cfg)
    assert props["inference_address"] == "http://127.0.0.1:18080"
    assert props["management_address"] == "http://127.0.0.1:18081"
    assert props["metrics_address"] == "http://127.0.0.1:18082"
    assert props["metrics_mode"] == "prometheus"
    assert Path(props["metrics_config"]).is_absolute() and Path(props["metrics_config"]).is_file()
    assert props["model_store"] == str(store.resolve()) and props["load_models"] == "demo=demo.mar"
    side = [int(props[k]) for k in ("grpc_inference_port", "grpc_management_port", "initial_worker_port")]
    assert 7070 not in side and 7071 not in side and 9000 not in side
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert "disable_token_authorization" not in props
    off = read_properties(write_config(tmp_path, model_store=store, load_models="all", ports=(1, 2, 3),
                                             token_auth=False))
    assert off["disable_token_authorization"] == "true"


def test_ports_option():
    assert parse_ports(None) == (8080, 8081, 8082)
    assert parse_ports("9000,9001,9002") == (9000, 9001, 9002)
    assert len(set(parse_ports("auto"))) == 3
    for bad in ("1,2", "a,b,c", "1,1,2", "0,1,2"):
        with pytest.raises(Exception, match="--ports"):
            parse_ports(bad)


def test_stop_without_a_server_is_a_no_op(tmp_path, capsys):
    assert main(["stop", "--run-dir", str(tmp_path)]) == 0
    assert "nothing to stop" in capsys.readouterr().out


def test_http_refuses_other_hosts():
    with pytest.raises(Exception, match="loopback"):
        http("http://example.com/")


def test_the_default_request_bound_leaves_room_for_json_instances_of_the_input():
    from guard.serving import default_max_request_bytes

    assert default_max_request_bytes((3, 32, 32)) == 1_048_576  # small inputs: 1 MiB
    one_224 = len(json.dumps([np.random.default_rng(0).random((3, 224, 224), dtype=np.float32).tolist()]))
    assert default_max_request_bytes((3, 224, 224)) >= 3 * one_224  # several float32 224x224 instances fit
