"""Controller state saved with the adapter: a run killed at step k and resumed from its checkpoint (fresh model,
``dt.load``, the optimizer's state restored) makes the same decisions as an uninterrupted run, bit for bit in fp32.

AdaLoRA on MiniLM (query/value, 12 matrices, T = 12, t_init = 2, t_final = 4, delta_t = 2): masking at steps 4
and 6, the final pattern fixed and pruned triplets removed at step 8. Resumed before masking (k = 2), at the
final-pattern step (k = 8) and after removal (k = 10, the checkpoint holds resized tensors). Without the controller
state (before this was saved), resuming at 2 changed the weights, at 4 and 8 the decisions (at 8 the pruning was
skipped); with ``shrink="never"`` the resumed adapter lacked the masked triplets."""
from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from helpers import make_minilm
from safetensors.torch import load_file

import deltatune as dt
from deltatune.io import read_record
from deltatune.io.state import CONTROLLER_PREFIX, join_state, split_state
from deltatune.train import TrainArgs, train
from deltatune.train.data import encode_classification


QV = ["query", "value"]


T = 12


ADALORA = dict(init_r=4, target_r=2, targets=QV, t_init=2, t_final=4, delta_t=2)


@pytest.fixture(scope="module")
def batches(minilm_dir, sst2_rows):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    out = []
    for i in range(3):
        rows = sst2_rows[4 * i: 4 * i + 4]
        b = dict(tok([t for t, _ in rows], padding=True, return_tensors="pt"))
        b["labels"] = torch.tensor([y for _, y in rows])
        out.append(b)
    return out


def _optimizer(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)


def _run(model, opt, batches, start, stop, tmp=None, save_at=()):
    """Steps ``start..stop-1`` of a bare loop; after step ``k - 1`` for ``k`` in ``save_at`` the adapter (with its
    controller state) goes to ``tmp/k<k>`` and the optimizer state is kept (the user's job)."""
    saved = {}
    for t in range(start, stop):
        model(**batches[t % len(batches)]).loss.backward()
        opt.step()
        dt.step(model, opt)
        opt.zero_grad()
        if t + 1 in save_at:
            dt.save(model, tmp / f"k{t + 1}")
            saved[t + 1] = copy.deepcopy(opt.state_dict())
    return saved


def _resume(minilm_dir, batches, tmp, k, opt_state, stop=T):
    model = make_minilm(minilm_dir)
    dt.load(model, tmp / f"k{k}")
    opt = _optimizer(model)
    opt.load_state_dict(opt_state)
    dt.begin(model, T, step=k)
    _run(model, opt, batches, k, stop)
    return model


def _snapshot(model, name="default"):
    return {mod: {k: v.detach().clone() for k, v in d.state_dict().items()} for mod, d in dt.deltas(model, name).items()}


def _assert_same(a, b):
    """Same decisions first (which tensors, their shapes: ranks, index sets; which gates are zero), then the same
    values bit for bit."""
    assert a.keys() == b.keys()
    assert {m: {k: tuple(t.shape) for k, t in a[m].items()} for m in a} == \
        {m: {k: tuple(t.shape) for k, t in b[m].items()} for m in b}
    for name in ("lam", "idx"):
        assert {m: (a[m][name] != 0).tolist() if name == "lam" else a[m][name].tolist() for m in a if name in a[m]} \
            == {m: (b[m][name] != 0).tolist() if name == "lam" else b[m][name].tolist() for m in b if name in b[m]}
    for mod in a:
        assert a[mod].keys() == b[mod].keys(), mod
        for k in a[mod]:
            assert a[mod][k].shape == b[mod][k].shape, (mod, k)
            assert torch.equal(a[mod][k], b[mod][k]), (mod, k, (a[mod][k] - b[mod][k]).abs().max())


@pytest.mark.parametrize("shrink, resume_at", [("final", (2, 4, 8, 10)), ("never", (10,))])
def test_adalora_resumed_at_any_step_ends_bit_identical(minilm_dir, batches, tmp_path, shrink, resume_at):
    """Before masking (2), at the first masking step (4), at the final-pattern step (8), after removal (10); with
    ``shrink="never"`` the pruned triplets stay behind a frozen mask: the adapter file leaves them out, the
    controller state keeps them (they still carry the orthogonal regularizer's gradients)."""
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.AdaLoRA(**ADALORA, shrink=shrink))
    opt = _optimizer(model)
    dt.begin(model, T)
    states = _run(model, opt, batches, 0, T, tmp_path, save_at=resume_at)
    want = _snapshot(model)
    ranks = {m: int(d.live().sum()) for m, d in dt.deltas(model, "default").items()}
    assert sum(ranks.values()) == 2 * 12 and len(set(ranks.values())) > 1  # a real allocation, not uniform
    if shrink == "final":  # the checkpoint after removal holds the resized tensors
        assert {m: s["r"] for m, s in read_record(tmp_path / "k10").modules.items()} == ranks
    for k in resume_at:
        resumed = _resume(minilm_dir, batches, tmp_path, k, states[k])
        _assert_same(_snapshot(resumed), want)
        assert dt.controller_metrics(resumed) == dt.controller_metrics(model)


def test_spiel_resumed_mid_accumulation_picks_the_same_indices(minilm_dir, batches, tmp_path):
    # reselection every 4 steps after watching 2: the trackers hold step 4's gradients when killed at k = 5
    method = dict(num_params=3000, targets=QV, reselection_steps=4, accumulation_steps=2, replace_rate=0.5)
    total = 10
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.SpIEL(**method))
    start = {m: d.idx.clone() for m, d in dt.deltas(model, "default").items()}
    opt = _optimizer(model)
    dt.begin(model, total)
    states = _run(model, opt, batches, 0, total, tmp_path, save_at=(1, 5))
    want = _snapshot(model)
    assert all(not torch.equal(want[m]["idx"], start[m]) for m in start)  # reselection moved entries
    for k in (1, 5):
        _resume_and_compare(minilm_dir, tmp_path / f"k{k}", states[k], batches, k, total, want)


def _resume_and_compare(minilm_dir, folder, optimizer_state, batches, k, total, want):
    """Load the checkpoint of step ``k`` onto a fresh model, run to ``total`` and compare with the full run."""
    resumed = make_minilm(minilm_dir)
    dt.load(resumed, folder)
    opt = _optimizer(resumed)
    opt.load_state_dict(optimizer_state)
    dt.begin(resumed, total, step=k)
    _run(resumed, opt, batches, k, total)
    _assert_same(_snapshot(resumed), want)


def test_ltsft_resumes_in_its_phase(minilm_dir, batches, tmp_path):
    total = 6
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.LTSFT(num_params=3000, targets=r".*layer\.[01]\.attention\.self\.(query|value)", full_steps=3))
    opt = _optimizer(model)
    dt.begin(model, total)
    states = _run(model, opt, batches, 0, total, tmp_path, save_at=(2, 4))
    want = _snapshot(model)
    assert sum(s["idx"].numel() for s in want.values()) == 3000
    assert read_record(tmp_path / "k2").controller["state"] == {"selected": False, "full_steps": 3}
    for k in (2, 4):  # phase 1, one step before the selection; phase 2
        _resume_and_compare(minilm_dir, tmp_path / f"k{k}", states[k], batches, k, total, want)


def test_increlora_resumed_keeps_its_growth_interval_and_grows_alike(minilm_dir, batches, tmp_path):
    # 12 matrices from rank 1 to 24 in total, 4 at a time: 3 events spread over the first half, every 2 steps;
    # recomputed from the remaining growth at step 3 the interval would be 3. Growth draws from torch's RNG, which
    # a resumed loop restores like the optimizer (the deltatune trainer does both)
    total = 12
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.IncreLoRA(init_r=1, target_r=2, top_h=4, targets=QV))
    opt = _optimizer(model)
    dt.begin(model, total)
    assert dt.controller(model).interval == 2
    torch.manual_seed(1)
    saved, rng = {}, {}
    for t in range(total):
        model(**batches[t % len(batches)]).loss.backward()
        opt.step()
        dt.step(model, opt)
        opt.zero_grad()
        if t + 1 == 3:
            dt.save(model, tmp_path / "k3")
            saved, rng = copy.deepcopy(opt.state_dict()), torch.get_rng_state()
    want = _snapshot(model)
    assert sum(d.r for d in dt.deltas(model, "default").values()) == 24
    resumed = make_minilm(minilm_dir)
    dt.load(resumed, tmp_path / "k3")
    opt = _optimizer(resumed)
    opt.load_state_dict(saved)
    dt.begin(resumed, total)  # continues at the restored step 3
    assert dt.model.registry(resumed).step == 3 and dt.controller(resumed).interval == 2
    torch.set_rng_state(rng)
    _run(resumed, opt, batches, 3, total)
    _assert_same(_snapshot(resumed), want)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def _same_state(a, b, where=""):
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu()), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), b)
        for k in a:
            _same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{where}/{i}")
    else:
        assert a == b or (a != a and b != b), (where, a, b)


@pytest.mark.parametrize("method", [
    dt.AdaLoRA(init_r=4, target_r=2, targets=["0", "2"], t_final=5, shrink="never"),  # final pattern at step 3
    dt.IncreLoRA(init_r=1, target_r=3, targets=["0", "2"], incre_interval=1, top_h=1),
    dt.SoRA(r=4, targets=["0", "2"], threshold=1e-2),
    dt.SpIEL(num_params=60, targets=["0", "2"], reselection_steps=6, accumulation_steps=5),  # saved mid-watch
    dt.LTSFT(num_params=60, targets=["0", "2"], full_steps=5),
    dt.OFT(block_size=8, targets=["0", "2"], radius=0.1),
    dt.SORSA(r=4, targets=["0", "2"]),
], ids=lambda m: m.name)
def test_every_controller_state_survives_save_and_load(method, tmp_path):
    net = dt.attach(_net(), method)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 16), torch.randn(8, 8)
    dt.begin(net, 8)
    for _ in range(4):
        ((net(x) - y) ** 2).mean().backward()
        dt.after_backward(net, opt)
        opt.step()
        dt.step(net, opt)
        opt.zero_grad()
    want = dt.controller(net).state_dict() if dt.controller(net) else {}
    if method.name in ("adalora", "spiel"):
        assert want["hidden" if method.name == "adalora" else "trackers"]  # the interesting part is there
    dt.save(net, tmp_path / "a")
    fresh = dt.load(_net(), tmp_path / "a")
    assert dt.model.registry(fresh).step == 4
    _same_state(want, dt.controller(fresh).state_dict() if dt.controller(fresh) else {})
    _same_state(_snapshot(net), _snapshot(fresh))


def _adalora_saved_after(minilm_dir, batches, steps, folder):
    """MiniLM with AdaLoRA trained ``steps`` steps and saved to ``folder``: ``(model, saved config)``."""
    model = make_minilm(minilm_dir)
    dt.attach(model, dt.AdaLoRA(**ADALORA))
    opt = _optimizer(model)
    dt.begin(model, T)
    _run(model, opt, batches, 0, steps)
    dt.save(model, folder)
    return model, json.loads((folder / "adapter_config.json").read_text())


def test_state_lives_in_the_adapter_files_under_a_reserved_prefix(minilm_dir, batches, tmp_path):
    model, config = _adalora_saved_after(minilm_dir, batches, 3, tmp_path / "a")
    assert config["controller"]["step"] == 3 and config["controller"]["state"]["total"] == T
    keys = list(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    state_keys = [k for k in keys if k.startswith(CONTROLLER_PREFIX)]
    assert state_keys and all(k.split("/")[2] in ("ibar", "ubar") for k in state_keys)
    rec = read_record(tmp_path / "a")
    assert not any(k.startswith("@") for ts in rec.tensors.values() for k in ts)  # module tensors only
    c = dt.controller(model)
    assert torch.equal(rec.controller["state"]["ibar"][next(iter(c.deltas))]["P"],
                       c.sens.ibar[next(iter(c.deltas.values())).P])
    # the default begin continues from the restored step; a finished schedule must be restarted explicitly
    fresh = make_minilm(minilm_dir)
    dt.load(fresh, tmp_path / "a")
    dt.begin(fresh, T)
    assert dt.model.registry(fresh).step == 3 and len(dt.controller(fresh).sens.ibar) == 36
    dt.begin(fresh, T, step=0)
    assert not dt.controller(fresh).sens.ibar
    with pytest.raises(ValueError, match="step=0"):
        dt.begin(fresh, 3, step=3)
    plain = make_minilm(minilm_dir)
    dt.load(plain, tmp_path / "a", controller_state=False)
    assert dt.model.registry(plain).step == 0 and not dt.controller(plain).sens.ibar
    dt.save(model, tmp_path / "b", controller_state=False)
    assert "controller" not in json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert not any(k.startswith("@") for k in load_file(tmp_path / "b" / "adapter_model.safetensors"))


def test_state_of_another_adapter_does_not_load_and_changes_nothing(minilm_dir, batches, tmp_path):
    model, config = _adalora_saved_after(minilm_dir, batches, 2, tmp_path / "a")
    mod = next(iter(config["controller"]["state"]["ibar"]))
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    key = config["controller"]["state"]["ibar"][mod]["P"]["@tensor"]
    tensors[key] = tensors[key][:, :1].contiguous()  # state of another shape
    from deltatune.files import write_adapter
    write_adapter(tmp_path / "bad", config, tensors)
    fresh = make_minilm(minilm_dir)
    with pytest.raises(ValueError, match=rf"{mod}\.P.*controller_state=False"):
        dt.load(fresh, tmp_path / "bad")
    assert dt.adapters(fresh) == []
    dt.load(fresh, tmp_path / "bad", controller_state=False)  # the adapter itself is fine


def test_state_split_round_trips_optimizer_state():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.8, 0.9))
    p.grad = torch.randn(3, 2)
    opt.step()
    value, tensors = split_state(opt.state_dict(), "opt/")
    back = join_state(json.loads(json.dumps(value, allow_nan=False)), tensors)
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = torch.optim.AdamW([q], lr=1e-2)
    opt2.load_state_dict(back)
    for o in (opt, opt2):
        o.param_groups[0]["params"][0].grad = torch.ones(3, 2)
        o.step()
    assert torch.equal(p, q)
    assert json.loads(json.dumps(split_state({"x": float("nan")}, "")[0]))["x"] == {"@float": "nan"}


def test_trainer_resumes_from_its_checkpoint(minilm_dir, sst2_rows, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    rows = [{"sentence": t, "label": y} for t, y in sst2_rows[:24]]
    data, _ = encode_classification(rows, tok, "sentence", "label", max_length=32)
    args = dict(max_steps=T, batch_size=4, lr=5e-3, save_every=4, progress=False, plot=False, shuffle=True)

    def fresh():
        m = make_minilm(minilm_dir)
        dt.attach(m, dt.AdaLoRA(**ADALORA))
        return m

    full = fresh()
    train(full, data, TrainArgs(**args), output_dir=tmp_path / "full")  # dropout on: RNG state is resumed too
    assert (tmp_path / "full" / "checkpoint-8" / "adapter" / "adapter_config.json").is_file()
    want = _snapshot(full)
    for k in (4, 8):
        resumed = fresh()
        out = train(resumed, data, TrainArgs(**args), output_dir=tmp_path / f"r{k}",
                    resume_from=tmp_path / "full" / f"checkpoint-{k}")
        assert out["steps"] == T
        _assert_same(_snapshot(resumed), want)
        _assert_same(_snapshot(dt.load(make_minilm(minilm_dir), tmp_path / f"r{k}" / "adapter")), want)


def _callback_saves():
    if importlib.util.find_spec("transformers") is None:
        return False
    from deltatune.train.callback import DeltatuneCallback

    return hasattr(DeltatuneCallback, "on_save")


@pytest.mark.skipif(not _callback_saves(), reason="enabled once DeltatuneCallback saves the adapter (with its "
                    "controller state) into Trainer checkpoints (on_save) and restores it on resume")
def test_hf_trainer_resume_with_callback_matches_an_uninterrupted_run(minilm_dir, sst2_rows, tmp_path):
    """Trainer(callbacks=[DeltatuneCallback()]) checkpointing every 4 steps; resuming from checkpoint-8 (the final
    pattern step of the AdaLoRA schedule) must end with the ranks and tensors of the uninterrupted run."""
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from deltatune.train import DeltatuneCallback

    tok = AutoTokenizer.from_pretrained(minilm_dir)
    rows = sst2_rows[:24]
    enc = tok([t for t, _ in rows], padding="max_length", truncation=True, max_length=32)
    ds = Dataset.from_dict({**enc, "labels": [y for _, y in rows]})

    def run(out, resume=None):
        model = make_minilm(minilm_dir)
        dt.attach(model, dt.AdaLoRA(**ADALORA))
        targs = TrainingArguments(output_dir=str(out), max_steps=T, per_device_train_batch_size=4, learning_rate=5e-3,
                                  save_steps=4, save_strategy="steps", logging_steps=100, report_to=[], seed=0,
                                  use_cpu=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, callbacks=[DeltatuneCallback()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-8"))
    assert {m: d.r for m, d in dt.deltas(resumed, "default").items()} == \
        {m: d.r for m, d in dt.deltas(full, "default").items()}
    _assert_same(_snapshot(resumed), _snapshot(full))


def test_attaching_a_new_adapter_after_loading_starts_a_new_run(tmp_path):
    net = dt.attach(_net(), dt.LoRA(r=2, targets=["0"]), name="lang")
    dt.begin(net, 5)
    for _ in range(5):
        dt.step(net)
    dt.save(net, tmp_path / "lang")
    fresh = dt.load(_net(), tmp_path / "lang")
    assert dt.model.registry(fresh).step == 5
    dt.attach(fresh, dt.AdaLoRA(init_r=2, target_r=1, targets=["2"]), name="task")
    dt.begin(fresh, 3)  # the frozen language adapter's 5 saved steps do not carry over to the new task run
    assert dt.model.registry(fresh).step == 0


def test_a_failed_restore_keeps_the_adapters_it_would_replace(tmp_path):
    """Resuming (HF callback, deltatune trainer) replaces adapters by a checkpoint's: a checkpoint that does not fit
    is refused before anything is deleted."""
    from deltatune.hf import restore

    net = dt.attach(_net(), dt.AdaLoRA(init_r=2, target_r=1, targets=["0", "2"]))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    other = dt.attach(torch.nn.Sequential(torch.nn.Linear(16, 30), torch.nn.Tanh(), torch.nn.Linear(30, 8)),
                      dt.AdaLoRA(init_r=2, target_r=1, targets=["0", "2"]))
    dt.save(other, tmp_path / "other")  # same names, other shapes
    with pytest.raises(ValueError, match="does not fit"):
        restore(net, tmp_path / "other")
    assert dt.adapters(net) == ["default"] and dt.controller(net) is not None
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_malformed_controller_entry_is_refused_and_changes_nothing(tmp_path):
    net = dt.attach(_net(), dt.AdaLoRA(init_r=2, target_r=1, targets=["0", "2"]))
    dt.begin(net, 4)
    net(torch.randn(3, 16)).square().sum().backward()
    dt.step(net)
    dt.save(net, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text())
    config["controller"] = {"state": config["controller"]["state"]}  # no step
    path.write_text(json.dumps(config))
    fresh = _net()
    with pytest.raises(ValueError, match="controller"):
        dt.load(fresh, tmp_path / "a")
    assert dt.adapters(fresh) == []
    # a frozen adapter loaded for inference leaves the step counter of the run alone
    config["controller"]["step"] = 1
    path.write_text(json.dumps(config))
    frozen = dt.attach(_net(), dt.LoRA(r=2, targets=["0"]), name="task")
    dt.load(frozen, tmp_path / "a", activate=False, is_trainable=False)
    assert dt.model.registry(frozen).step == 0 and not dt.model.registry(frozen).restored


def test_format_version_is_2_only_with_controller_state(tmp_path):
    """Older deltatune versions (format 1) read plain adapters; one carrying controller state says it is newer."""
    net = dt.attach(_net(), dt.AdaLoRA(init_r=2, target_r=1, targets=["0", "2"]))
    dt.save(net, tmp_path / "state")
    dt.save(net, tmp_path / "plain", controller_state=False)
    version = {n: json.loads((tmp_path / n / "adapter_config.json").read_text())["format_version"]
               for n in ("state", "plain")}
    assert version == {"state": 2, "plain": 1}
    assert dt.adapters(dt.load(_net(), tmp_path / "state")) == ["default"]


def test_spiel_resumed_without_begin_watches_the_right_steps(tmp_path):
    """``dt.load`` then ``dt.step`` alone (no ``dt.begin``): the controller learns the step only at the first
    ``after_step``, yet every resume point, inside a watch (k % 4 < 2) or not, ends with the full run's entries."""
    method = dict(num_params=60, targets=["0", "2"], reselection_steps=4, accumulation_steps=2, replace_rate=0.5)
    total = 12
    torch.manual_seed(1)
    data = [(torch.randn(8, 16), torch.randn(8, 8)) for _ in range(total)]

    def run(net, opt, start, stop, save=False):
        saved = {}
        for t in range(start, stop):
            ((net(data[t][0]) - data[t][1]) ** 2).mean().backward()
            opt.step()
            dt.step(net, opt)
            opt.zero_grad()
            if save:
                dt.save(net, tmp_path / f"k{t + 1}")
                saved[t + 1] = copy.deepcopy(opt.state_dict())
        return saved

    net = dt.attach(_net(), dt.SpIEL(**method))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    dt.begin(net, total)
    states = run(net, opt, 0, total, save=True)
    want = _snapshot(net)
    for k in range(1, total):
        resumed = dt.load(_net(), tmp_path / f"k{k}")
        opt = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
        opt.load_state_dict(copy.deepcopy(states[k]))
        run(resumed, opt, k, total)
        _assert_same(_snapshot(resumed), want)


def test_controller_protocol_is_driven(minilm_dir, minilm_batch):
    calls = []

    class Counting(dt.Controller):
        def __init__(self, model):
            self.model = model

        def after_backward(self, info):
            assert any(p.grad is not None for p in self.model.parameters() if p.requires_grad)
            calls.append(("backward", info.step))

        def after_step(self, info):
            calls.append(("step", info.step))

    class CountingLoRA(dt.LoRA):
        def controller(self, deltas, model):
            return Counting(model)

    model = make_minilm(minilm_dir).train()
    dt.attach(model, CountingLoRA(r=2, targets=["query"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(**minilm_batch).logits.sum().backward()
        dt.after_backward(model)
        opt.step()
        dt.step(model, opt)
        opt.zero_grad()
    assert calls == [("backward", 0), ("step", 0), ("backward", 1), ("step", 1)]


def test_the_model_does_not_keep_the_optimizer_alive():
    """dt.step / dt.after_backward remember the last optimizer for the controllers, weakly: after training the
    optimizer and its state go when the user drops them."""
    import gc
    import weakref

    from torch import nn

    net = dt.attach(nn.Sequential(nn.Linear(8, 8)), dt.AdaLoRA(init_r=2, target_r=1, targets=["0"], t_init=1,
                                                                  t_final=1, delta_t=1))
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    dt.begin(net, 4)
    for _ in range(2):
        net(torch.randn(4, 8)).pow(2).mean().backward()
        dt.after_backward(net, opt)
        opt.step()
        dt.step(net, opt)
        opt.zero_grad()
    gone = weakref.ref(opt)
    del opt
    gc.collect()
    assert gone() is None
