"""Every flag a command shows reaches the process it is for (unit tier: parsers and configs, no server).

- `--no-auth` turns auth off and `--auth` (or nothing) leaves it on; `--no-generator` turns the
  generator off; `LOOPSERVE_AUTH=false` does what `--no-auth` does.
- A service config survives the trip `up` makes it take: config -> flags -> the child's parser ->
  the same config, field for field.
- `up` hands the reward service the shared flags and its own, with its ports; the trainer gets the CA
  for a TLS reward service, and its parser reads it.
- `serve --engine ray` refuses the flags Ray's proxy cannot honour and forwards the metrics port.
- `demo --store-dir` is the store the demo takes its base versions from.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from loopserve import cli
from loopserve.config import PolicyConfig, RewardConfig, add_arguments, from_namespace, to_argv
from loopserve.demo.annotation import AnnotationDemoOptions, _prepare_store
from loopserve.embedded import StackPorts, _trainer_argv, reward_config
from loopserve.labelstudio.config import MLBackendConfig
from loopserve.model_store import ModelStore
from loopserve.ray_serve import ray_app_args
from trainer.__main__ import add_flags
from trainer.config import TrainerArgs


def _parse(command: list[str]) -> argparse.Namespace:
    return cli.build_parser().parse_args(command)


def test_no_flags_mean_what_they_say() -> None:
    cfg = from_namespace(PolicyConfig, _parse(["policy", "--no-auth", "--no-generator"]), environ={})
    assert cfg.auth is False and cfg.generator is False
    cfg = from_namespace(PolicyConfig, _parse(["policy", "--generator"]), environ={})
    assert cfg.auth is True and cfg.generator is True
    assert from_namespace(PolicyConfig, _parse(["policy", "--auth"]), environ={}).auth is True
    assert from_namespace(PolicyConfig, _parse(["up", "--no-auth"]), environ={}).auth is False
    assert from_namespace(PolicyConfig, _parse(["policy"]), environ={"LOOPSERVE_AUTH": "false"}).auth is False
    assert from_namespace(MLBackendConfig, _parse(["ml-backend", "--no-auth"]), environ={}).auth is False
    assert _parse(["labelstudio", "connect", "--no-auth"]).auth is False


@pytest.mark.parametrize("cls", [PolicyConfig, RewardConfig])
def test_a_config_survives_the_trip_through_flags(cls: type, tmp_path: Path) -> None:
    original = cls(
        data_dir=tmp_path,
        store_dir=tmp_path / "elsewhere",
        port=1234,
        metrics_port=-1,
        metrics_host="0.0.0.0",
        auth=False,
        tls_cert=tmp_path / "c.pem",
        tls_key=tmp_path / "k.pem",
        max_text_chars=50,
        max_queue=7,
        grace_s=2.5,
    )
    if cls is PolicyConfig:
        original = dataclasses.replace(original, generator=False, log_decisions=False, review_threshold=0.5)
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    assert from_namespace(cls, parser.parse_args(to_argv(original)), environ={}) == original


def test_up_hands_the_reward_service_its_flags_and_the_trainer_its_ca(tmp_path: Path) -> None:
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    limits = ["--max-text-chars", "50", "--max-pairs-per-request", "7"]
    ns = _parse(["up", "--no-auth", *tls, *limits, "--reward-port", "6000", "--metrics-host", "10.0.0.1"])
    policy = from_namespace(PolicyConfig, ns, environ={})
    reward = reward_config(policy, from_namespace(RewardConfig, ns, environ={}), StackPorts(ns.reward_port))
    assert not reward.auth and reward.tls_cert == Path("c.pem") and reward.max_text_chars == 50
    assert reward.max_pairs_per_request == 7 and reward.port == 6000 and reward.metrics_port == 9102
    assert reward.metrics_address == "10.0.0.1"

    parser = argparse.ArgumentParser()
    add_flags(parser)
    parser.add_argument("--log-level")
    for ca in (None, tmp_path / "ca.pem"):
        argv = _trainer_argv(policy, reward, ca)[1:]  # after the `train` subcommand
        args = from_namespace(TrainerArgs, parser.parse_args(argv))
        assert args.reward_tls_ca == (ca or Path("c.pem")) and args.reward_target == "127.0.0.1:6000"


def test_serve_on_ray_refuses_what_its_proxy_cannot_do_and_forwards_metrics(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--engine", "ray", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tls-cert" in err[0] and "--engine ray" in err[0]  # before Ray starts
    with pytest.raises(ValueError, match="--tls-cert"):
        ray_app_args(_parse(["serve", "--engine", "ray", "--tls-cert", "c.pem", "--tls-key", "k.pem"]))
    with pytest.raises(ValueError, match="--port"):
        ray_app_args(_parse(["serve", "--engine", "ray", "--port", "1"]))
    with pytest.raises(ValueError, match="--shadow-fraction"):  # shadow mode is embedded-only
        ray_app_args(_parse(["serve", "--engine", "ray", "--shadow-fraction", "0.5"]))
    args = ray_app_args(_parse(["serve", "--engine", "ray", "--metrics-port", "9200", "--proxy-host", "0.0.0.0"]))
    assert args["policy"]["metrics_port"] == 9200 and args["reward"]["metrics_port"] == 9201
    assert args["policy"]["host"] == args["reward"]["host"] == "0.0.0.0"


def test_demo_store_dir_is_where_the_base_versions_come_from(tiny_data_dir: Path, tmp_path: Path) -> None:
    empty_data_dir = tmp_path / "data"
    flags = ["demo", "--data-dir", str(empty_data_dir), "--store-dir", str(tiny_data_dir / "store")]
    opts = cli.demo_options(_parse(flags))
    assert isinstance(opts, AnnotationDemoOptions)
    assert cli.demo_options(_parse([*flags, "--generation"])).store_dir == tiny_data_dir / "store"
    run = tmp_path / "run"
    _prepare_store(opts, run, ["great", "other"])
    assert ModelStore(run / "store").latest("annotator") == "v0"
    assert not (empty_data_dir / "store").exists()
