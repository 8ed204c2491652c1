"""Trial groups (rlhf_ablate/run/groups.py, rlhf_ablate/ppo/group.py): PPO trials that share an SFT model and RM
train together on one base. A member is still a trial: the same first rollout as alone, gradients only into its own
adapters, its own result.json and cache entry, and a member that fails leaves the group while the others go on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from rlhf_ablate.errors import ConfigError

SMALL = {"sft.max_steps": 2, "rm.max_steps": 2, "sft.batch_size": 4, "rm.batch_size": 4,
         "data.max_sft": 8, "data.max_rm_groups": 8, "data.max_ppo_prompts": 16, "data.max_eval": 4,
         "model.max_length": 96, "ppo.total_episodes": 16, "ppo.rollout_batch_size": 8,
         "ppo.mini_batch_size": 4, "ppo.grad_accum": 2, "ppo.rollout_micro_batch_size": 4,
         "ppo.ppo_epochs": 1, "ppo.max_new_tokens": 8, "ppo.max_prompt_length": 40, "eval.max_new_tokens": 6}


OTHER_RM = {"rm.learning_rate": 2e-3}


def _spec(axes: dict, group_size=3, seeds=(0,), write_to=None, **sections):
    """The sweep (and with ``write_to``, its file there)."""
    import yaml

    from rlhf_ablate.config.sweep import load_sweep, parse_sweep

    raw = {"name": "groups", "base": SMALL, "axes": axes, "seeds": list(seeds),
           "resources": {"group_size": group_size}, "tracking": {"wandb": "disabled"}, **sections}
    if write_to is None:
        return parse_sweep(raw, "groups.yaml")
    write_to.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return load_sweep(write_to)


@pytest.fixture(scope="module")
def upstream(builtin_cache, tmp_path_factory):
    """A finished solo trial: its SFT and RM artifacts, the data and the trial's config."""
    from rlhf_ablate.config import trial_config_from_overrides
    from rlhf_ablate.data import load_data
    from rlhf_ablate.run.cache import StageCache
    from rlhf_ablate.run.trial import run_trial

    root = tmp_path_factory.mktemp("groups_upstream")
    cache = StageCache(root / "stages")
    cfg = trial_config_from_overrides({**SMALL, "ppo.kl_coef": 0.05})
    r = run_trial(cfg, root, cache=cache)
    assert r["status"] == "ok", r.get("error")
    from rlhf_ablate.stages.rm import train_rm

    sft = cache.path("sft", r["timings"]["sft"]["key"])
    other_rm = root / "other_rm"  # a second RM on the same SFT model (another learning rate)
    other_rm.mkdir()
    train_rm(trial_config_from_overrides({**SMALL, **OTHER_RM}), load_data(cfg.data), sft, other_rm)
    return {"sft": sft, "rm": cache.path("rm", r["timings"]["rm"]["key"]), "other_rm": other_rm,
            "data": load_data(cfg.data), "root": root}


def test_route_rows_trains_each_row_through_its_own_adapter_only(builtin_cache):
    """models/lora.py: route_rows, in training mode with gradient checkpointing: each row's output is the one its
    adapter gives alone, and a loss on member A's rows sends no gradient to member B's adapter."""
    from peft import get_peft_model

    from rlhf_ablate.config import ModelConfig
    from rlhf_ablate.models import (enable_gradient_checkpointing, ensure_builtin, load_causal_lm, make_lora_config,
                                    route_rows)

    with pytest.raises(ValueError, match="contiguous"):
        route_rows(None, ["a", "b", "a"])

    torch.manual_seed(0)
    base = load_causal_lm(ModelConfig(quantization="none"), ensure_builtin("tiny-llama"), quantize=False)
    enable_gradient_checkpointing(base)
    lcfg = make_lora_config(4, 8, 0.0, "CAUSAL_LM", base)
    model = get_peft_model(base, lcfg, adapter_name="a")
    model.add_adapter("b", lcfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # non-zero B: the adapters change the output
            torch.nn.init.normal_(p, std=0.05)
        p.requires_grad_(".a." in n or ".b." in n)
    model.train()
    ids = torch.randint(5, 200, (4, 12))
    alone = {}
    with torch.no_grad():
        for name in ("a", "b"):
            model.set_adapter(name)
            alone[name] = model(input_ids=ids).logits
    for n, p in model.named_parameters():
        p.requires_grad_(".a." in n or ".b." in n)
    with route_rows(model, ["a", "a", "b", "b"]):
        out = model(input_ids=ids).logits
        for row, name in enumerate(["a", "a", "b", "b"]):
            assert torch.allclose(out[row], alone[name][row], atol=1e-5)
        out[:2].pow(2).mean().backward()  # rows of adapter a only
    grads = {n: p.grad for n, p in model.named_parameters() if "lora_A" in n}
    a_norm = sum(g.norm() for n, g in grads.items() if ".a." in n and g is not None)
    assert a_norm > 0
    assert all(g is None or g.abs().max() == 0 for n, g in grads.items() if ".b." in n)


def test_a_member_rolls_out_and_trains_as_it_would_alone(upstream, tmp_path, monkeypatch):
    """Three members against their solo runs, CPU fp32: two kl_coef values with the builder's RM and one with an RM
    of its own (another RM learning rate on the same SFT model: its rows are scored through its own reward adapter).
    The first rollout's tokens equal and its log-probs within 1e-5 (the batch is wider), and every logged statistic
    of both steps equal to 1e-5 (measured: equal to the last digit at these sizes; docs/architecture.md, "Trial
    groups")."""
    import rlhf_ablate.ppo.group as group
    import rlhf_ablate.ppo.loop as loop
    from rlhf_ablate.config import trial_config_from_overrides

    seen: dict[str, list] = {"solo": [], "group": []}
    solo_score, group_score = loop.score_batch, group._score
    monkeypatch.setattr(loop, "score_batch", lambda roles, b, t: _keep(seen["solo"], b, solo_score(roles, b, t)))
    monkeypatch.setattr(group, "_score", lambda roles, live, b, t: _keep(seen["group"], b,
                                                                         group_score(roles, live, b, t)))
    cfgs = [trial_config_from_overrides({**SMALL, "ppo.kl_coef": kl, "seed": s, **extra})
            for kl, s, extra in ((0.05, 0, {}), (0.5, 3, {}), (0.2, 0, OTHER_RM))]
    rms = [upstream["rm"], upstream["rm"], upstream["other_rm"]]
    solo = []
    for k, cfg in enumerate(cfgs):
        out = tmp_path / f"solo{k}"
        out.mkdir()
        loop.train_ppo(cfg, upstream["data"], upstream["sft"], rms[k], out)
        solo.append(json.loads((out / "history.json").read_text()))
    outs = [tmp_path / f"g{k}" for k in range(3)]
    for o in outs:
        o.mkdir()
    assert group.train_ppo_group(cfgs, upstream["data"], upstream["sft"], rms, outs, [None] * 3) == ({}, set())
    n = SMALL["ppo.rollout_batch_size"]
    for k in range(3):
        s_resp, s_mask, s_lp = seen["solo"][2 * k]  # member k's first step alone
        g_resp, g_mask, g_lp = (x[k * n:(k + 1) * n] for x in seen["group"][0])
        R = s_resp.shape[1]
        assert torch.equal(s_resp, g_resp[:, :R]) and g_mask[:, R:].sum() == 0
        assert ((s_lp - g_lp[:, :R]) * s_mask).abs().max() <= 1e-5
        grouped = json.loads((outs[k] / "history.json").read_text())
        assert len(grouped) == len(solo[k]) == 2
        for a, b in zip(solo[k], grouped):
            for key in ("objective/scores", "objective/kl", "loss/policy", "loss/value", "objective/entropy"):
                assert a[key] == pytest.approx(b[key], abs=1e-5), (k, a["step"], key)
        assert (outs[k] / "adapter" / "adapter_model.safetensors").is_file()
    assert seen["group"][0][0].shape[0] == 3 * n  # one batched rollout for all members
    # The members' evals in one batched pass equal each member's eval alone: the same greedy answers and KL samples,
    # the same rewards (each from its own RM) and KLs within rounding
    from rlhf_ablate.stages.evaluate import evaluate_policies, evaluate_policy

    evals = [tmp_path / f"eval{k}" for k in range(3)]
    alone = [tmp_path / f"eval_alone{k}" for k in range(3)]
    for d in evals + alone:
        d.mkdir()
    evaluate_policies(cfgs, upstream["data"], "ppo", upstream["sft"], rms, outs, evals)
    for k in range(3):
        evaluate_policy(cfgs[k], upstream["data"], "ppo", upstream["sft"], rms[k], outs[k], alone[k])
        got, want = (json.loads((d / "records.json").read_text()) for d in (evals[k], alone[k]))
        assert [r["generation"] for r in got] == [r["generation"] for r in want]
        for a, b in zip(got, want):
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-5)
            assert a["kl_to_ref"] == pytest.approx(b["kl_to_ref"], abs=1e-4)
        assert json.loads((evals[k] / "metrics.json").read_text()).keys() == \
            json.loads((alone[k] / "metrics.json").read_text()).keys()


def _keep(into: list, b: dict, out: dict) -> dict:
    into.append((b["resp"].clone(), b["rmask"].clone(), out["old_logprobs"].clone()))
    return out


def test_a_grouped_sweep_keeps_the_layout_isolates_a_failing_member_and_resumes(builtin_cache, tmp_path):
    """Four members (kl_coef x kl_stop, one seed) in one group, run one by one as a SLURM array task runs a group
    (`trial --group 0 --group-size 4`): the first at PPO trains all four, the two whose KL check fails
    (ppo.kl_stop < 0) are recorded failed with the group's error and never trained alone, the other finds its PPO
    stage and its eval (batched with the builder's) in the cache; result.json names the group; a rerun rebuilds
    nothing."""
    from rlhf_ablate.cli import main
    from rlhf_ablate.config.sweep import expand
    from rlhf_ablate.rundir import read_result
    from rlhf_ablate.run.cache import read_executions
    from rlhf_ablate.run.trial import run_trial_in_sweep

    spec = _spec({"ppo.kl_coef": [0.05, 0.5], "ppo.kl_stop": [50.0, -1.0]}, group_size=4,
                 cache_dir=str(tmp_path / "stages"), write_to=tmp_path / "groups.yaml")
    trials = expand(spec)
    assert main(["trial", str(tmp_path / "groups.yaml"), "--group", "0", "--group-size", "4",
                 "--out", str(tmp_path / "run")]) == 1  # two members failed
    results = [read_result(tmp_path / "run", t.trial_id) for t in trials]
    status = {t.trial_id: r["status"] for t, r in zip(trials, results)}
    bad = [t.trial_id for t in trials if t.config.ppo.kl_stop < 0]
    assert all(status[i] == ("failed" if i in bad else "ok") for i in status), status
    for t, r in zip(trials, results):
        if t.trial_id in bad:
            assert r["error"]["stage"] == "ppo" and "KL blow-up" in r["error"]["message"]
            assert "in a group built by trial " + trials[0].trial_id in r["error"]["message"]
        else:
            assert set(r["group"]["members"]) == {x.trial_id for x in trials}
            assert r["records"]["ppo"] and "ppo/rougeL" in r["metrics"]
            # the builder evaluated the group's trained members in one batched eval (stages/evaluate.py)
            assert r["timings"]["eval_ppo"]["cache_hit"] == (t.trial_id != trials[0].trial_id)
    # one build that trained (the group, in trial 0's PPO stage), one commit (the other good member), and each
    # failed member's stage failing at once with the group's error: nobody trained alone
    ppo = [e for e in read_executions(tmp_path / "stages") if e["stage"] == "ppo"]
    assert sorted(e["status"] for e in ppo) == ["failed", "failed", "ok", "ok"]
    assert sum(e["seconds"] > 1.0 for e in ppo) == 1
    before = len(read_executions(tmp_path / "stages"))
    again = [run_trial_in_sweep(spec, t, tmp_path / "run") for t in trials if t.trial_id not in bad]
    assert all(r["status"] == "ok" for r in again) and len(read_executions(tmp_path / "stages")) == before


def test_a_stopped_member_leaves_the_group_and_the_others_go_on(upstream, tmp_path, monkeypatch):
    """A scheduler's stop (SystemExit inside a step's report, as Ray Tune raises it) of a waiting member and of the
    builder's own trial, in one group of three: the waiting member's trial reported steps 1-2 live and left its stop;
    the builder took both out at the next step, trained the third to the end and committed it alone, then ended its
    own trial with the stop; the third member's trial reported each of its steps exactly once (live, then the rest
    from its committed history)."""
    import threading

    import rlhf_ablate.ppo.group as group
    from rlhf_ablate.config import trial_config_from_overrides
    from rlhf_ablate.run import groups
    from rlhf_ablate.run.cache import StageCache
    from rlhf_ablate.run.graph import Ctx

    monkeypatch.setattr(groups, "POLL_S", 0.02)
    outcome = {}
    real = group.train_ppo_group
    monkeypatch.setattr(group, "train_ppo_group", lambda *a, **k: outcome.setdefault("r", real(*a, **k)))
    cache = StageCache(upstream["root"] / "stages")  # where the members' RM is built
    cfgs = [trial_config_from_overrides({**SMALL, "ppo.total_episodes": 32, "ppo.kl_coef": kl}) for kl in (.05, .2, .5)]
    keys = [f"stopped{k}" for k in range(3)]
    stop_of = {1: groups._beside(cache, keys[1], groups.STOP)}

    def builder_reports(event):
        if event.get("step") == 3:  # after member 1's trial was stopped at step 2: then its own trial is stopped
            while not stop_of[1].is_file():
                threading.Event().wait(0.02)
            raise SystemExit(0)

    c = Ctx(cfgs[0], upstream["data"], {"sft": upstream["sft"], "rm": upstream["rm"]}, builder_reports, cache,
            {"ppo": keys[0]}, [(f"t{k}", cfgs[k], {"ppo": keys[k], "rm": upstream["rm"].name}) for k in (1, 2)])
    out = tmp_path / "own"
    out.mkdir()
    ended = []

    def build():
        try:
            groups.build_group(c, out, None, lambda cfg: ("adapter/adapter_model.safetensors", "metrics.json"))
        except BaseException as e:  # noqa: BLE001 - what the builder's trial sees
            ended.append(e)

    thread = threading.Thread(target=build)
    thread.start()
    while not groups._beside(cache, keys[2], groups.STEPS).is_file():
        threading.Event().wait(0.02)
    seen = {1: [], 2: []}

    def stopped_at_2(event):
        seen[1].append(event["step"])
        if event["step"] == 2:
            raise SystemExit(0)

    with pytest.raises(SystemExit):
        groups.follow(cache, keys[1], stopped_at_2)
    sent = groups.follow(cache, keys[2], lambda e: seen[2].append(e["step"]))
    thread.join()
    assert len(ended) == 1 and isinstance(ended[0], SystemExit)
    assert outcome["r"] == ({}, {0, 1})
    assert seen[1] == [1, 2] and not stop_of[1].exists()  # the builder took the stop
    assert cache.is_complete("ppo", keys[2]) and not cache.is_complete("ppo", keys[1])
    history = json.loads((cache.path("ppo", keys[2]) / "history.json").read_text())
    groups.replay(history, sent, lambda e: seen[2].append(e["step"]))
    assert seen[2] == [1, 2, 3, 4] and [r["step"] for r in history] == [1, 2, 3, 4]
    assert json.loads((cache.path("ppo", keys[2]) / "group.json").read_text())["members"] == [cfgs[0].trial_id,
                                                                                               "t1", "t2"]
    assert not (out / "group.json").exists() and not list((upstream["root"] / "stages" / "ppo").glob("*.jsonl"))


def test_a_member_does_not_wait_for_a_builder_that_died(tmp_path, monkeypatch):
    """A builder killed mid-way leaves its steps file (no cleanup runs) and no lock holder: the waiting member reports
    what was written and returns to the stage cache, which then builds its stage, instead of waiting forever."""
    from rlhf_ablate.run import groups
    from rlhf_ablate.run.cache import StageCache

    monkeypatch.setattr(groups, "POLL_S", 0.01)
    cache = StageCache(tmp_path / "stages")
    steps = groups._beside(cache, "k", groups.STEPS)
    steps.parent.mkdir(parents=True)
    steps.write_text(json.dumps({"stage": "ppo", "step": 1}) + "\n" + '{"stage": "pp', encoding="utf-8")
    seen = []
    assert groups.follow(cache, "k", seen.append) == 1 and seen == [{"stage": "ppo", "step": 1}]


def test_group_size_is_validated_planned_and_estimated(builtin_cache, monkeypatch):
    from rlhf_ablate.config.sweep import expand
    from rlhf_ablate.launch.resources import group_column, resolve_group_size
    from rlhf_ablate.run.graph import estimate_trial_memory_gb
    from rlhf_ablate.launch.resources import group_memory_gb, group_stage_bytes
    from rlhf_ablate.run.groups import plan_groups

    for bad in (0, "big", 1.5, True):
        with pytest.raises(ConfigError, match="resources.group_size"):
            _spec({"ppo.kl_coef": [0.1, 0.2]}, group_size=bad)
    # a scheduler stops members one by one (test below): groups and ASHA go together
    asha = _spec({"ppo.kl_coef": [0.1, 0.2]}, group_size=2, scheduler={"type": "asha"})
    assert [len(g) for g in plan_groups(asha, expand(asha))] == [2]
    # RMs that are adapters on the SFT model: members with different RMs group (each scores with its own); an RM
    # trained from the base model is a model of its own, so only members sharing it group
    rms = {"ppo.kl_coef": [0.1, 0.2], "rm.learning_rate": [1e-3, 2e-3]}
    assert [len(g) for g in plan_groups(_spec(rms, group_size=4), expand(_spec(rms, group_size=4)))] == [4]
    base_rm = _spec(rms, group_size=4, overrides=[{"when": {"seed": 0}, "set": {"rm.init_from": "base"}}])
    assert [len(g) for g in plan_groups(base_rm, expand(base_rm))] == [2, 2]
    # kl_coef x seeds: one group per seed (a seed is its own SFT model); lora rank splits groups; rank 0 stays alone
    spec = _spec({"ppo.kl_coef": [0.01, 0.1, 1.0], "ppo.lora_rank": [0, 8]}, group_size="auto", seeds=(0, 1),
                 overrides=[{"when": {"ppo.lora_rank": 0}, "set": {"model.quantization": "none"}}])
    trials = expand(spec)
    monkeypatch.setenv("RLHF_ABLATE_GPUS", "")
    resolved = resolve_group_size(spec, trials)
    assert resolved.resources.group_size == 3
    groups = plan_groups(resolved, trials)
    sizes = sorted(len(g) for g in groups)
    assert sizes == [1] * 6 + [3, 3]
    for g in groups:
        assert len({(t.seed, t.config.ppo.lora_rank) for t in g}) == 1
    col = group_column(resolved, trials)["group"]
    assert sum(c.startswith("alone (ppo.lora_rank=0") for c in col) == 6
    # memory: K members hold K adapter sets and K times the rows; on a small GPU auto picks a smaller K
    cfg = next(t.config for t in trials if t.config.ppo.lora_rank == 8)
    assert group_memory_gb(cfg, 1) == pytest.approx(estimate_trial_memory_gb(cfg))
    ev1, ev3 = group_stage_bytes(cfg, 1)["eval_ppo"], group_stage_bytes(cfg, 3)["eval_ppo"]
    assert ev3["phase:generation"] == 3 * ev1["phase:generation"] and ev3["phase:kl"] > 2.5 * ev1["phase:kl"]
    assert ev3["peak"] - ev1["peak"] == ev3["largest_phase"] - ev1["largest_phase"] > 0  # one base, wider passes
    solo, three = group_stage_bytes(cfg, 1)["ppo"], group_stage_bytes(cfg, 3)["ppo"]
    assert three["trainable"] == 3 * solo["trainable"] and three["weights"] == solo["weights"]
    assert 2.5 * solo["largest_phase"] < three["largest_phase"] < 3.5 * solo["largest_phase"]


def test_auto_group_size_of_the_gpu_recommended_sweep_follows_the_gpu(tmp_path):
    """sweeps/gpu_recommended.yaml with Llama-3.2-1B's published shape (saved locally: no hub) and group_size auto:
    three kl_coef values per seed, so K = 3 where three fit the GPU with the packing margin, fewer on a smaller one;
    the dry run's estimate of each member is its group's."""
    from rlhf_ablate.config.sweep import expand, load_sweep
    from rlhf_ablate.launch.resources import estimate_gb, resolve_group_size
    from rlhf_ablate.models.families import family_config
    from rlhf_ablate.launch.resources import group_memory_gb

    family_config("llama-3.2-1b").save_pretrained(tmp_path)
    path = Path(__file__).resolve().parents[1] / "rlhf_ablate" / "sweeps" / "gpu_recommended.yaml"
    spec = load_sweep(path, {"model.base_model": str(tmp_path)})
    spec = dataclasses.replace(spec, resources=dataclasses.replace(spec.resources, group_size="auto"))
    trials = expand(spec)
    gb = [group_memory_gb(trials[0].config, k) * 1.25 for k in (1, 2, 3)]
    assert gb[0] < gb[1] < gb[2] < 10.0  # 1B: three members fit a 24 GB card
    for free, k in ((80.0, 3), ((gb[1] + gb[2]) / 2, 2), ((gb[0] + gb[1]) / 2, 1)):
        resolved = resolve_group_size(spec, trials, gpus=[free])
        assert resolved.resources.group_size == k, (free, k)
    resolved = resolve_group_size(spec, trials, gpus=[80.0])
    assert estimate_gb(resolved, trials[0]) == pytest.approx(gb[2] / 1.25)
