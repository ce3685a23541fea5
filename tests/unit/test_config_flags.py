"""Every flag a command shows reaches the process it is for (unit tier: the one config reader and the
configs each command builds, no server).

- One reader (loopserve.config.parse, tyro): `--no-auth` turns auth off and `--auth` (or nothing)
  leaves it on; the environment sets what the flags do not (`LOOPSERVE_AUTH=false`), a flag beats it;
  a bad value or an unknown flag is a usage error, not a silent default.
- A service config survives the trip `up` makes it take: config -> flags -> the child's parser -> the
  same config, field for field.
- `up` hands each flag family to the processes it is for: auth, TLS (the trainer gets the CA), limits
  and ports to both services, the reward's own flags to the reward service, the trainer's to the trainer,
  the adapter's to the adapter.
- `serve --engine ray` refuses the flags Ray's proxy cannot honour, hands every other one to the
  applications (read back by the replicas' own reader), and forwards the metrics port.
- `train` reads its nested objective configs from flags and from the JSON file.
- `demo --store-dir` is the store the demo takes its base versions from; one demo's flag given to the
  other is a usage error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from loopserve.cli import command as cli
from loopserve.cli.demo.annotation import AnnotationDemoOptions, _prepare_store, _trainer_flags
from loopserve.cli.demo.generation import GenerationDemoOptions
from loopserve.cli.serve import ray_app_args
from loopserve.cli.up import _trainer_argv, stack_configs
from loopserve.config import PolicyConfig, RewardConfig, parse, to_argv
from loopserve.labelstudio.config import MLBackendConfig
from loopserve.models.store import ModelStore
from loopserve.serving.ray import RayDeploymentConfig, read_configs
from trainer.__main__ import read_args
from trainer.annotation_policy import AnnotationPolicyConfig


def config(argv: list[str], environ: dict[str, str] | None = None) -> Any:
    return cli.parse_command(argv, environ=environ or {})[1]


def test_no_flags_mean_what_they_say() -> None:
    cfg = config(["policy", "--no-auth", "--no-generator"])
    assert cfg.auth is False and cfg.generator is False
    assert config(["policy", "--generator"]).auth is True
    assert config(["policy", "--auth"]).auth is True
    assert config(["up", "--no-auth"]).auth is False
    assert config(["up", "--no-trainer"]).trainer is False
    assert config(["ml-backend", "--no-auth"]).auth is False
    assert config(["labelstudio", "connect", "--no-auth"]).auth is False
    assert config(["serve", "--no-auth"]).auth is False


def test_the_environment_sets_what_flags_leave_unset_and_a_flag_wins() -> None:
    env = {"LOOPSERVE_AUTH": "false", "LOOPSERVE_MAX_QUEUE": "7", "LOOPSERVE_EXPLORE": "softmax"}
    cfg = config(["policy"], env)
    assert (cfg.auth, cfg.max_queue, cfg.explore) == (False, 7, "softmax")
    cfg = config(["policy", "--auth", "--max-queue", "9"], env)
    assert (cfg.auth, cfg.max_queue) == (True, 9)
    assert read_args([], environ={"LOOPSERVE_ROUND_MIN_EVENTS": "5"}).round_min_events == 5
    with pytest.raises(ValueError, match="LOOPSERVE_AUTH"):
        config(["policy"], {"LOOPSERVE_AUTH": "maybe"})


@pytest.mark.parametrize(
    "argv",
    [
        ["policy", "--max-queue", "many"],  # not an int
        ["policy", "--explore", "thompson"],  # not a choice
        ["policy", "--no-such-flag"],
        ["up", "--max-pairs-per-request"],  # no value
        ["train", "--annotator.epochs", "x"],
        # a one-shot command shows only the settings it uses: no --device where no model runs
        ["log", "export", "--device", "cuda"],
        ["models", "list", "--log-url", "x.sqlite3"],
    ],
)
def test_a_bad_flag_is_a_usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        if argv[0] == "train":
            read_args(argv[1:], environ={})
        else:
            config(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    flag = next(a for a in argv if a.startswith("--"))
    assert "--help" in err and flag.lstrip("-").split(".")[0] in err  # names the flag, points at help


@pytest.mark.parametrize("cls", [PolicyConfig, RewardConfig, MLBackendConfig])
def test_a_config_survives_the_trip_through_flags(cls: type, tmp_path: Path) -> None:
    values: dict[str, Any] = {"data_dir": tmp_path, "auth": False, "port": 1234}
    if cls is not MLBackendConfig:
        values |= {
            "store_dir": tmp_path / "elsewhere",
            "metrics_port": -1,
            "metrics_host": "0.0.0.0",
            "tls_cert": tmp_path / "c.pem",
            "tls_key": tmp_path / "k.pem",
            "max_text_chars": 50,
            "max_queue": 7,
            "grace_s": 2.5,
        }
    original = cls(**values)
    if cls is PolicyConfig:
        original = dataclasses.replace(
            original, generator=False, log_decisions=False, review_threshold=0.5, explore="ucb"
        )
    assert parse(cls, to_argv(original), environ={}) == original


def test_up_hands_every_flag_family_to_the_process_it_is_for(tmp_path: Path) -> None:
    auth = ["--no-auth"]
    tls = ["--tls-cert", "c.pem", "--tls-key", "k.pem"]
    limits = [
        "--max-text-chars",
        "50",
        "--max-queue",
        "11",
        "--max-pairs-per-request",
        "7",
        "--max-items-per-request",
        "3",
    ]
    ports = ["--policy-port", "5000", "--reward-port", "6000", "--metrics-host", "10.0.0.1"]
    up = config(["up", *auth, *tls, *limits, *ports])
    policy, reward = stack_configs(up)
    # each child reads back exactly the config `up` built for it
    assert config(["policy", *to_argv(policy)]) == policy
    assert config(["reward", *to_argv(reward)]) == reward
    for service in (policy, reward):  # shared: auth, TLS, limits, metrics host
        assert not service.auth and service.tls_cert == Path("c.pem") and service.tls_key == Path("k.pem")
        assert service.max_text_chars == 50 and service.max_queue == 11
        assert service.metrics_address == "10.0.0.1"
    assert policy.max_items_per_request == 3 and reward.max_pairs_per_request == 7  # each its own
    assert (policy.port, policy.metrics_port, reward.port, reward.metrics_port) == (5000, 9101, 6000, 9102)
    assert config(["up", "--metrics-port", "9300"]).metrics_port == 9300
    assert stack_configs(config(["up", "--metrics-port", "9300"]))[1].metrics_port == 9301
    assert stack_configs(config(["up", "--metrics-port", "-1"]))[1].metrics_port == -1
    # the trainer: the reward service's port, and a CA to trust for its certificate
    for ca in (None, tmp_path / "ca.pem"):
        argv = _trainer_argv(policy, reward, ca)[1:]  # after the `train` subcommand
        args = read_args(argv, environ={})
        assert args.reward_tls_ca == (ca or Path("c.pem")) and args.reward_target == "127.0.0.1:6000"
    # ... and the precision the policy serves in, which the trainer judges the annotator in
    for dtype in ("auto", "float32", "bfloat16"):
        served, _ = stack_configs(config(["up", "--dtype", dtype]))
        assert served.dtype == dtype
        assert read_args(_trainer_argv(served, reward, None)[1:], environ={}).annotator.eval_dtype == dtype


def test_serve_on_ray_refuses_what_its_proxy_cannot_do_and_forwards_the_rest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["serve", "--engine", "ray", "--tls-cert", "c.pem", "--tls-key", "k.pem"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tls-cert" in err[0] and "--engine ray" in err[0]  # before Ray starts
    with pytest.raises(ValueError, match="--port"):
        ray_app_args(config(["serve", "--engine", "ray", "--port", "1"]))
    with pytest.raises(ValueError, match="--shadow-fraction"):  # shadow mode is embedded-only
        ray_app_args(config(["serve", "--engine", "ray", "--shadow-fraction", "0.5"]))
    flags = ["--metrics-port", "9200", "--proxy-host", "0.0.0.0", "--no-auth", "--max-queue", "5"]
    ray = ["--num-replicas", "3", "--num-cpus", "0.5", "--batching", "serve"]
    served = config(["serve", "--engine", "ray", *flags, *ray, "--max-pairs-per-request", "9"])
    args = ray_app_args(served)
    assert args["policy"]["metrics_port"] == 9200 and args["reward"]["metrics_port"] == 9201
    # what each replica reads back with the replicas' reader (loopserve.serving.ray.read_configs)
    policy, deployment = read_configs(PolicyConfig, args["policy"], environ={})
    reward, _ = read_configs(RewardConfig, args["reward"], environ={})
    assert policy.metrics_address == reward.metrics_address == "0.0.0.0"
    assert not policy.auth and not reward.auth and policy.max_queue == reward.max_queue == 5
    assert reward.max_pairs_per_request == 9
    assert deployment == RayDeploymentConfig(num_replicas=3, num_cpus=0.5, batching="serve")
    with pytest.raises(ValueError, match="unknown application args"):
        read_configs(PolicyConfig, {"no_such_setting": 1}, environ={})
    # The ingress is the cluster's, not an application's (tests/e2e/test_process_abuse.py starts both).
    assert served.ingress == "haproxy" and config(["serve", "--ingress", "proxy"]).ingress == "proxy"
    assert "ingress" not in args["policy"] and "ingress" not in args["reward"]
    with pytest.raises(SystemExit) as bad:
        cli.main(["serve", "--engine", "ray", "--ingress", "nginx"])
    assert bad.value.code == 2


def test_train_reads_its_objective_sections_from_flags_and_from_json(tmp_path: Path) -> None:
    overrides = tmp_path / "objectives.json"
    overrides.write_text(json.dumps({"gate": {"kl_bound": 0.25}, "lora": {"r": 4}}))
    args = read_args(
        ["--annotator.epochs", "3", "--no-reward-normalised", "--objectives-json", str(overrides)], environ={}
    )
    assert args.annotator.epochs == 3 and args.reward_normalised is False
    assert args.gate.kl_bound == 0.25 and args.lora.r == 4


def test_the_demos_self_training_flag_reaches_the_trainer_and_the_passive_baseline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--pseudo-label-ratio: None keeps the trainer's default, --quick turns self-training off unless the
    flag says otherwise, and whatever it is reaches the trainer (its objectives file) and the passive
    baseline (the recipe the demo trains it with). With --generation it is a usage error."""
    flags = ["demo", "--data-dir", str(tmp_path)]

    def trainer_and_passive(opts: AnnotationDemoOptions) -> tuple[float, float]:
        run = tmp_path / "run"
        run.mkdir(exist_ok=True)
        trainer = read_args(_trainer_flags(opts, run), environ={}).annotator.pseudo_label_ratio
        return trainer, opts.annotator_config().pseudo_label_ratio

    default = cli.demo_options(config(flags))
    assert trainer_and_passive(default) == (AnnotationPolicyConfig.pseudo_label_ratio,) * 2 == (1.5, 1.5)
    quick = cli.demo_options(config([*flags, "--quick"]))
    quick.apply_quick()
    assert trainer_and_passive(quick) == (0.0, 0.0)
    given = cli.demo_options(config([*flags, "--quick", "--pseudo-label-ratio", "0.5"]))
    given.apply_quick()
    assert trainer_and_passive(given) == (0.5, 0.5)
    with pytest.raises(SystemExit) as bad:
        cli.demo_options(config([*flags, "--generation", "--pseudo-label-ratio", "0.5", "--top-up", "always"]))
    assert bad.value.code == 2
    assert "--top-up, --pseudo-label-ratio: the annotation demo's" in capsys.readouterr().err


def test_the_generation_demos_objective_is_refused_by_the_annotation_demo(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--objective belongs to --generation: its default (grpo) is the generation demo's own, and given to the
    annotation demo it is a usage error (exit 2), not a flag that does nothing."""
    flags = ["demo", "--data-dir", str(tmp_path)]
    assert cli.demo_options(config([*flags, "--generation"])).objective == GenerationDemoOptions.objective == "grpo"
    assert cli.demo_options(config([*flags, "--generation", "--objective", "dpo"])).objective == "dpo"
    with pytest.raises(SystemExit) as bad:
        cli.demo_options(config([*flags, "--quick", "--objective", "ppo"]))
    assert bad.value.code == 2
    assert "--objective: the generation demo's: add --generation" in capsys.readouterr().err


def test_demo_store_dir_is_where_the_base_versions_come_from(tiny_data_dir: Path, tmp_path: Path) -> None:
    empty_data_dir = tmp_path / "data"
    flags = ["demo", "--data-dir", str(empty_data_dir), "--store-dir", str(tiny_data_dir / "store")]
    opts = cli.demo_options(config(flags))
    assert isinstance(opts, AnnotationDemoOptions) and opts.top_up == "never"
    assert cli.demo_options(config([*flags, "--top-up", "stream-end"])).top_up == "stream-end"
    assert cli.demo_options(config([*flags, "--generation"])).store_dir == tiny_data_dir / "store"
    run = tmp_path / "run"
    _prepare_store(opts, run, ["great", "other"])
    assert ModelStore(run / "store").latest("annotator") == "v0"
    assert not (empty_data_dir / "store").exists()
