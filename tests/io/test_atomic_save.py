"""Crash safety of every save: a forked child SIGKILLs itself at the k-th step of a save (deterministic: the
``deltatune.files._step`` hook, called after each step that changes the disk), for every k until the save
completes; then the folder must load as exactly the old or exactly the new checkpoint (tensors compared), keep the
user's other files, and the next save must leave nothing else behind."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.io import adapter_folders, read_record
from deltatune import files as F
from helpers import make_minilm

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork")


# -- helpers ---------------------------------------------------------------------------------------------------------
def killed_at(k: int, action) -> bool:
    """Run ``action()`` in a forked child that SIGKILLs itself at the ``k``-th call of ``F._step``; ``True`` if it
    was killed, ``False`` if the action finished first (k is past the last step)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        torch.set_num_threads(1)  # the parent's thread pool did not survive the fork (as in DataLoader workers)
        calls = [0]

        def hook(name):
            calls[0] += 1
            if calls[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
        F._step = hook
        try:
            action()
            code = 0
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, "the save failed in the child"
    return False


def every_kill(reset, action, check) -> int:
    """For k = 1, 2, ...: ``reset()``, kill ``action`` at step k, ``check(k)``; until the action completes.
    Returns the number of kill points."""
    k = 0
    while True:
        k += 1
        reset()
        was_killed = killed_at(k, action)
        check(k)
        if not was_killed:
            return k - 1
        assert k < 50, "the save never completed"


def tiny(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def with_adapters(specs: dict[str, int], seed: int) -> nn.Module:
    """A tiny model with adapters ``{name: rank}``, their factors all non-zero and drawn from ``seed``."""
    model = tiny()
    g = torch.Generator().manual_seed(seed)
    for name, r in specs.items():
        dt.attach(model, dt.LoRA(r=r, targets=["0", "2", "4"]), name=name)
        with torch.no_grad():
            for d in dt.deltas(model, name).values():
                for p in d.parameters():
                    p.copy_(torch.randn(p.shape, generator=g))
    return model


def snapshot(folder: Path, make=None) -> dict:
    """``{adapter: (method config, modules, {module: {tensor: value}})}`` as loads read the folder (onto
    ``make()``, default :func:`tiny`)."""
    model = (make or tiny)()
    out = {}
    for sub, f in adapter_folders(folder).items():
        rec = read_record(f, sub or None, model)
        out[rec.name] = (rec.method, rec.modules, rec.tensors)
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for n in a:
        (ma, sa, ta), (mb, sb, tb) = a[n], b[n]
        if ma != mb or sa != sb or ta.keys() != tb.keys():
            return False
        for mod in ta:
            if ta[mod].keys() != tb[mod].keys() or not all(torch.equal(ta[mod][t], tb[mod][t]) for t in ta[mod]):
                return False
    return True


def user_files(folder: Path) -> None:
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    (folder / "runs" / "events.txt").write_text("tensorboard")
    (folder / "notes.txt").write_text("mine")


def assert_user_files(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "runs" / "events.txt").read_text() == "tensorboard"


def visible(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def run_kill_matrix(tmp_path, old_model, new_model, save, user=True):
    """Old checkpoint + user files in ``target``; kill ``save(new_model, target)`` at every step; each time the
    folder is exactly old or new; the next save cleans up. Returns (kill points, states seen)."""
    ref_old, ref_new = tmp_path / "ref-old", tmp_path / "ref-new"
    save(old_model, ref_old)
    save(new_model, ref_new)
    old, new = snapshot(ref_old), snapshot(ref_new)
    assert not same(old, new)
    parent = tmp_path / "work"
    target = parent / "ckpt"
    seen = []

    def reset():
        if parent.exists():
            import shutil
            shutil.rmtree(parent)
        parent.mkdir()
        save(old_model, target)
        if user:
            user_files(target)

    def check(k):
        got = snapshot(target)
        state = "old" if same(got, old) else "new" if same(got, new) else None
        assert state is not None, f"kill at step {k}: the folder is neither the old nor the new checkpoint"
        seen.append(state)
        if user:
            assert_user_files(target)
        save(new_model, target)  # the next save: cleans every leftover
        assert same(snapshot(target), new)
        assert visible(parent) == ["ckpt"], f"kill at step {k}: leftovers {visible(parent)}"
        if user:
            assert_user_files(target)

    n = every_kill(reset, lambda: save(new_model, target), check)
    assert n >= 6 and seen[0] == "old" and seen[-1] == "new"
    return n, seen


def save_own(model, path):
    dt.save(model, path)


# -- every kill point ------------------------------------------------------------------------------------------------
def test_single_adapter_save_killed_at_every_step(tmp_path):
    n, seen = run_kill_matrix(tmp_path, with_adapters({"a": 2}, 1), with_adapters({"a": 2}, 2), save_own)
    assert "old" in seen and "new" in seen


def test_two_adapter_save_killed_at_every_step(tmp_path):
    run_kill_matrix(tmp_path, with_adapters({"a": 2, "b": 3}, 1), with_adapters({"a": 2, "b": 3}, 2), save_own)


@pytest.mark.parametrize("old_specs,new_specs", [({"a": 2}, {"a": 2, "b": 3}), ({"a": 2, "b": 3}, {"c": 4})],
                         ids=["one-to-two", "two-to-one"])
def test_layout_change_killed_at_every_step(tmp_path, old_specs, new_specs):
    """B2: a layout change (one adapter <-> several) is one generation: never a mix, never a stale root config."""
    run_kill_matrix(tmp_path, with_adapters(old_specs, 1), with_adapters(new_specs, 2), save_own)


def test_peft_export_killed_at_every_step(tmp_path):
    run_kill_matrix(tmp_path, with_adapters({"a": 2}, 1), with_adapters({"a": 4}, 2),
                    lambda m, p: dt.save(m, p, format="peft"))


def test_cli_export_killed_at_every_step(tmp_path):
    """``deltatune export`` (write_record) into an existing PEFT folder."""
    from deltatune.cli import main

    sources = {}

    def export(model, path):
        src = sources.setdefault(id(model), tmp_path / f"src{len(sources)}")
        if not src.exists():
            dt.save(model, src)
        assert main(["export", str(src), "--to", "peft", str(path)]) == 0
    run_kill_matrix(tmp_path, with_adapters({"a": 2}, 1), with_adapters({"a": 3}, 2), export, user=False)


def test_fallback_swap_without_exchange(tmp_path, monkeypatch):
    """Without ``RENAME_EXCHANGE`` the swap is two renames; a kill between them leaves no target, loads say so,
    and the next save (or ``recover``) brings the old generation back before writing the new one."""
    monkeypatch.setattr(F, "_EXCHANGE", False)
    old_model, new_model = with_adapters({"a": 2}, 1), with_adapters({"a": 2}, 2)
    parent, target = tmp_path / "work", tmp_path / "work" / "ckpt"
    dt.save(old_model, tmp_path / "ref")
    old = snapshot(tmp_path / "ref")
    missing = []

    def reset():
        import shutil
        shutil.rmtree(parent, ignore_errors=True)
        parent.mkdir()
        dt.save(old_model, target)
        user_files(target)

    def check(k):
        if not target.exists():  # killed between the two renames
            missing.append(k)
            with pytest.raises(FileNotFoundError, match="killed save left its previous content"):
                dt.load(tiny(), target)
            F.recover(target)
            assert same(snapshot(target), old)
        assert_user_files(target)
        dt.save(new_model, target)
        assert visible(parent) == ["ckpt"]
        assert_user_files(target)

    every_kill(reset, lambda: dt.save(new_model, target), check)
    assert len(missing) == 1


def test_single_file_writes_killed_at_every_step(tmp_path):
    """config.yaml / results.json / calibration files: old or new content, and no temp file after the next write."""
    path = tmp_path / "results.json"

    def reset():
        F.write_text(path, "old\n")

    def check(k):
        assert path.read_text() in ("old\n", "new\n")
        F.write_text(path, "new\n")
        assert visible(tmp_path) == ["results.json"]

    assert every_kill(reset, lambda: F.write_text(path, "new\n"), check) == 2


# -- the trainer -----------------------------------------------------------------------------------------------------
class Tiny(nn.Module):
    """A classifier on 8 features (the trainer calls ``model(**inputs)``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = tiny()

    def forward(self, x):
        return self.net(x)


def tiny_data(n=16):
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, generator=g), "labels": torch.tensor(i % 3)} for i in range(n)]


def collate(rows):
    return {"x": torch.stack([r["x"] for r in rows]), "labels": torch.stack([r["labels"] for r in rows])}


def train_tiny(out: Path, steps: int, seed: int):
    from deltatune.train import TrainArgs, train

    model = Tiny()
    dt.attach(model, dt.LoRA(r=2, targets=["net.0", "net.2"]), name="a")
    args = TrainArgs(max_steps=steps, batch_size=4, lr=1e-2, progress=False, plot=False, seed=seed)
    return train(model, tiny_data(), args, collate_fn=collate, output_dir=out), model


def test_trainer_final_save_killed_at_every_step(tmp_path):
    """``train(..., output_dir=)`` into the folder of an earlier run, killed at every step of its final save: the
    adapter is the earlier run's or the new run's, whole; the earlier run's metrics are kept; the next run cleans."""
    from deltatune.train.trainer import read_metrics

    out, ref, clean = tmp_path / "run", tmp_path / "ref", tmp_path / "clean"
    train_tiny(ref, 2, seed=1)
    train_tiny(clean, 2, seed=2)
    old, new = snapshot(ref / "adapter", Tiny), snapshot(clean / "adapter", Tiny)
    assert not same(old, new)
    ref_lines = (ref / "metrics.jsonl").read_text().splitlines()
    seen = []

    def reset():
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(ref, out)

    def check(k):
        got = snapshot(out / "adapter", Tiny)
        seen.append("old" if same(got, old) else "new" if same(got, new) else None)
        assert seen[-1] is not None, f"kill at step {k}: the adapter is neither the old nor the new one"
        lines = (out / "metrics.jsonl").read_text().splitlines()
        assert lines[:3] == ref_lines and len(lines) == 6  # the earlier run kept, the new run's 3 records after
        train_tiny(out, 1, seed=3)  # the next run's save removes what the killed one left
        assert [p for p in os.listdir(out) if p.startswith(".")] == []
        assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]

    assert every_kill(reset, lambda: train_tiny(out, 2, seed=2), check) >= 6
    assert seen[0] == "old" and seen[-1] == "new"


def test_metrics_survive_a_kill_mid_training_and_a_rerun(tmp_path):
    """metrics.jsonl is appended, never truncated: a run killed at its 3rd step keeps the earlier run's records and
    its own first two; a partial last line (a kill while writing) is skipped by the reader and the next run starts
    on a line of its own."""
    from deltatune.train.trainer import RUN_START, read_metrics

    out = tmp_path / "run"
    train_tiny(out, 2, seed=1)
    first = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in first] == [1, 2]

    def killed_run():
        calls = [0]
        from deltatune.train import trainer

        real = trainer.loss_sum

        def loss_then_die(*a, **k):  # the 3rd training forward: SIGKILL, deterministic
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        trainer.loss_sum = loss_then_die
        train_tiny(out, 5, seed=2)

    assert killed_at(10**6, killed_run)  # killed by the hook above, not by F._step
    everything = read_metrics(out / "metrics.jsonl", runs="all")
    assert sum(RUN_START in r for r in everything) == 2
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]  # the killed run's two steps
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # what a kill in the middle of a write leaves
    train_tiny(out, 1, seed=3)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert len(read_metrics(out / "metrics.jsonl", runs="all")) == 3 + 3 + 2  # marker+2, marker+2, marker+1


# -- other files in the folder, layouts, names -----------------------------------------------------------------------
def test_other_files_and_checkpoint_folders_are_kept(tmp_path):
    """A Trainer-like output folder: checkpoint-* subfolders (adapters themselves), logs and files survive every
    save into the folder and every layout change; the previous generation's adapters do not."""
    out = tmp_path / "out"
    dt.save(with_adapters({"a": 2}, 1), out / "checkpoint-1")
    user_files(out)
    ckpt = snapshot(out / "checkpoint-1")
    for specs in ({"a": 2}, {"a": 2, "b": 3}, {"c": 2}, {"d": 2, "e": 2}):
        model = with_adapters(specs, 5)
        dt.save(model, out)
        assert_user_files(out)
        assert same(snapshot(out / "checkpoint-1"), ckpt)
        loaded = dt.load(tiny(), out)
        # one adapter: the root config; several: every adapter subfolder, the user's checkpoint-1 among them
        assert sorted(dt.adapters(loaded)) == sorted(specs) if len(specs) == 1 \
            else sorted(dt.adapters(loaded)) == sorted([*specs, "checkpoint-1"])
        names = set(os.listdir(out)) - {"runs", "notes.txt", "checkpoint-1", F.MANIFEST_NAME}
        want = set(specs) if len(specs) > 1 else {F.CONFIG_NAME, F.WEIGHTS_NAME}
        assert names == want, specs  # nothing stale from the previous layout
    assert visible(tmp_path) == ["out"]


@pytest.mark.parametrize("first,second", [({"a": 2}, {"a": 2, "b": 3}), ({"a": 2, "b": 3}, {"a": 4})],
                         ids=["single-then-two", "two-then-single"])
def test_stale_layout_is_never_loaded(tmp_path, first, second):
    """B2: after a save, a load gives exactly the adapters of that save (before: the old root config won)."""
    dt.save(with_adapters(first, 1), tmp_path / "x")
    model = with_adapters(second, 2)
    dt.save(model, tmp_path / "x")
    loaded = dt.load(tiny(), tmp_path / "x")
    assert sorted(dt.adapters(loaded)) == sorted(second)
    for name in second:
        for mod, d in dt.deltas(loaded, name).items():
            for t, v in d.tensors().items():
                assert torch.equal(v, dt.deltas(model, name)[mod].tensors()[t])


def test_empty_path_and_file_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    model = with_adapters({"a": 2}, 1)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        dt.save(model, "")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="existing file"):
        dt.save(model, tmp_path / "file")
    assert visible(tmp_path) == ["file"] and (tmp_path / "file").read_text() == "x"


def test_a_bad_second_name_writes_nothing(tmp_path):
    """B9: names are checked before anything is written; the old checkpoint stays."""
    model = with_adapters({"a": 2}, 1)
    dt.save(model, tmp_path / "x")
    before = snapshot(tmp_path / "x")
    long = "n" * 300
    dt.attach(model, dt.LoRA(r=2, targets=["0"]), name=long)
    with pytest.raises(ValueError, match="255 bytes"):
        dt.save(model, tmp_path / "x")
    assert same(snapshot(tmp_path / "x"), before) and visible(tmp_path) == ["x"]
    with pytest.raises(OSError):  # a failure half-way (here: the file system) also leaves nothing
        F.write_generation(tmp_path / "x", lambda s: (s / long / long).mkdir(parents=True))
    assert same(snapshot(tmp_path / "x"), before) and visible(tmp_path) == ["x"]


def test_saving_into_the_working_folder_keeps_it_usable(tmp_path, monkeypatch):
    target = tmp_path / "x"
    model = with_adapters({"a": 2}, 1)
    dt.save(model, target)
    monkeypatch.chdir(target)
    dt.save(with_adapters({"a": 2}, 2), ".")
    assert Path.cwd() == target and os.path.exists("adapter_config.json")
    assert visible(tmp_path) == ["x"]


def test_saving_into_the_base_model_folder_is_refused(minilm_dir, tmp_path):
    import shutil


    base = tmp_path / "base"
    shutil.copytree(minilm_dir, base)
    model = make_minilm(base)
    dt.attach(model, dt.LoRA(r=2, targets=["query"]))
    before = visible(base)
    for target in (base, tmp_path):
        with pytest.raises(ValueError, match="base model's folder"):
            dt.save(model, target)
    assert visible(base) == before
    dt.save(model, base / "adapters")  # inside it is fine


def test_a_user_entry_named_like_an_adapter_is_refused_not_replaced(tmp_path):
    """A multi-adapter save writes one folder per adapter: an existing user folder of that name that no save wrote
    is refused (it would have been deleted with the old generation), and stays whole."""
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "logs" / "user.txt").write_text("mine")
    with pytest.raises(ValueError, match="logs"):
        dt.save(with_adapters({"logs": 2, "c": 1}, seed=1), out)
    assert (out / "logs" / "user.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["logs"]


def test_folder_without_manifest_does_not_keep_its_old_adapter_subfolders(tmp_path):
    """A multi-adapter folder written without a manifest (an older deltatune, PEFT): its adapter subfolders belong
    to that save, so saving one adapter over it leaves no stale adapters behind."""
    out = tmp_path / "out"
    dt.save(with_adapters({"a": 2, "b": 1}, seed=1), out)
    (out / F.MANIFEST_NAME).unlink()
    (out / "notes.txt").write_text("kept")
    dt.save(with_adapters({"c": 2}, seed=2), out)
    assert list(snapshot(out)) == ["c"] and (out / "notes.txt").read_text() == "kept"
    assert not (out / "a").exists() and not (out / "b").exists()


def test_a_folder_that_cannot_be_swapped_gives_a_clear_error_and_stays_whole(tmp_path, monkeypatch):
    """A mount point (a container volume) cannot be renamed: the save says to use a subfolder, leaves the old
    checkpoint and no staging folder behind."""
    import errno

    out = tmp_path / "out"
    dt.save(with_adapters({"a": 2}, seed=1), out)
    want = snapshot(out)

    def busy(new, target):
        raise OSError(errno.EBUSY, "Device or resource busy")
    monkeypatch.setattr(F, "_swap_in", busy)
    with pytest.raises(OSError, match="subfolder"):
        dt.save(with_adapters({"a": 2}, seed=2), out)
    assert same(snapshot(out), want) and sorted(os.listdir(tmp_path)) == ["out"]
