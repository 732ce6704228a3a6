"""LoRA extraction from full fine-tunes, export of every structure to PEFT, and the merge / extract / export CLI,
on real MiniLM weights with PEFT loading what we write."""
from __future__ import annotations

import pytest
import torch
import yaml
from helpers import logits, make_minilm, randomize
from safetensors.torch import save_file

import deltatune as dt
from deltatune.cli import main
from deltatune.io import read_record

HEAD = "classifier"


def _state(model, drop=()):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if not any(k.startswith(d) for d in drop)}


@pytest.fixture
def fine_tune(minilm_dir, tmp_path):
    """A base checkpoint without a head, and a 'full fine-tune' = base + a rank-3 LoRA + a new head."""
    lora = make_minilm(minilm_dir)
    dt.attach(lora, dt.LoRA(r=3, alpha=6, targets=["query", "value", "intermediate.dense"]), name="x")
    randomize(lora, "x", std=0.05)
    dWs = {mod: d.dense().detach() for mod, d in dt.deltas(lora, "x").items()}
    tuned = make_minilm(minilm_dir)
    with torch.no_grad():
        for mod, dW in dWs.items():
            tuned.get_submodule(mod).weight += dW
        tuned.classifier.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    save_file(_state(make_minilm(minilm_dir), drop=[HEAD]), tmp_path / "base.safetensors")
    save_file(_state(tuned), tmp_path / "tuned.safetensors")
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", dWs, tuned


def test_extraction_recovers_a_rank_r_update_exactly_and_loads_in_peft(fine_tune, minilm_dir, minilm_batch,
                                                                        tmp_path):
    from peft import PeftModel

    base, tuned_path, dWs, tuned = fine_tune
    record, report = dt.extract(base, tuned_path, rank=3)
    assert set(report.ranks) == set(dWs) and set(report.ranks.values()) == {3}
    assert max(report.errors.values()) < 1e-3
    assert report.kept_whole == [HEAD]  # the base has no head: it is kept whole (modules_to_save)
    assert report.unchanged == 6 * 6 + 3 + 1 - len(dWs)  # 6 matrices a block, 3 embeddings, the pooler
    for mod, dW in dWs.items():
        t = record.tensors[mod]
        torch.testing.assert_close(t["B"] @ t["A"], dW, atol=2e-6, rtol=1e-4)
    # the energy threshold finds the rank itself; a lower rank is worse
    _, by_energy = dt.extract(base, tuned_path, energy=0.999)
    assert set(by_energy.ranks.values()) == {3}
    _, low = dt.extract(base, tuned_path, rank=1)
    assert min(low.errors.values()) > 0.1
    # the CLI writes a PEFT checkpoint; PEFT on the base reproduces the fine-tuned model
    assert main(["extract", str(base), str(tuned_path), str(tmp_path / "lora"), "--rank", "3"]) == 0
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir, seed=3), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(ref, minilm_batch), logits(tuned, minilm_batch), atol=1e-4, rtol=0)


def test_extraction_reports_what_it_cannot_extract_and_refuses_bad_input(fine_tune, minilm_dir, tmp_path, capsys):
    base, tuned_path, dWs, tuned = fine_tune
    state = _state(tuned)
    ln = "bert.encoder.layer.0.output.LayerNorm.weight"
    state[ln] = state[ln] * 1.1
    save_file(state, tmp_path / "tuned_ln.safetensors")
    _, report = dt.extract(base, tmp_path / "tuned_ln.safetensors", rank=3, targets=["query"])
    assert set(report.ranks) == {m for m in dWs if m.endswith("query")}  # targets select modules
    assert report.skipped == {} and report.kept_whole == []  # the LayerNorm and head are not targets
    _, report = dt.extract(base, tmp_path / "tuned_ln.safetensors", rank=3)
    assert list(report.skipped) == [ln] and abs(report.skipped[ln] - 0.1) < 1e-4
    assert "changed but not a weight matrix" in report.summary()
    with pytest.raises(ValueError, match="give rank"):
        dt.extract(base, tuned_path)
    with pytest.raises(ValueError, match="nothing to extract"):
        dt.extract(base, base, rank=2)
    emb = "bert.embeddings.word_embeddings.weight"  # a fine-tune that added tokens: the table is resized
    state[emb] = torch.cat([state[emb], torch.zeros(2, state[emb].shape[1])])
    save_file(state, tmp_path / "resized.safetensors")
    _, report = dt.extract(base, tmp_path / "resized.safetensors", rank=3)
    assert report.resized == [emb] and set(report.ranks) == set(dWs) and "resized" in report.summary()
    save_file({"encoder.x.weight": torch.ones(3, 3)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a base model and its fine-tune"):
        dt.extract(base, tmp_path / "other.safetensors", rank=2)
    assert main(["extract", str(base), str(tmp_path / "missing"), str(tmp_path / "o"), "--rank", "2"]) == 2
    assert "no such safetensors file" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        dt.extract(base, tmp_path / "junk.safetensors", rank=2)


def test_extraction_reads_layer_kinds_from_the_config_and_tolerates_prefixes(tmp_path):
    """GPT-2: Conv1D weights are stored (in x out) and the token table is an embedding; the base is saved as the
    bare GPT2Model (no 'transformer.' prefix, no head)."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    tuned = GPT2LMHeadModel(config).eval()
    tuned.transformer.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "start")
    dt.attach(tuned, dt.LoRA(r=2, targets=["c_attn", "mlp.c_proj", "wte"]), name="x")
    randomize(tuned, "x", std=0.1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = tuned(ids).logits
    dt.unload(tuned, merge=True).save_pretrained(tmp_path / "tuned")
    record, report = dt.extract(tmp_path / "base", tmp_path / "tuned", rank=2)
    assert {spec["layer"] for spec in record.modules.values()} == {"conv1d", "embedding", "linear"}
    assert report.kept_whole == ["lm_head"] and max(report.errors.values()) < 1e-3
    assert set(report.ranks) == {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_proj")} \
        | {"transformer.wte"}
    dt.io.write_record(tmp_path / "lora", record, format="peft")
    ref = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "start"), tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, want, atol=1e-4, rtol=0)


def _mixed(minilm_dir):
    model = make_minilm(minilm_dir)
    for name, method in {"lora": dt.LoRA(r=4, targets=["query", "value"]),
                         "spiel": dt.SpIEL(density=0.001, targets=["value", "intermediate.dense"]),
                         "s2ft": dt.S2FT(v_ratio=0.1, o_ratio=0.1, d_ratio=0.02),
                         "oft": dt.OFT(block_size=32, targets=["query"])}.items():
        dt.attach(model, method, name=name, activate=False)
        randomize(model, name, std=0.02, seed=len(name))
    return model


def test_every_structure_exports_to_a_peft_lora_that_matches(minilm_dir, minilm_batch, tmp_path, capsys):
    from peft import PeftModel

    model = _mixed(minilm_dir)
    save_file(_state(make_minilm(minilm_dir)), tmp_path / "base.safetensors")
    for name in ("spiel", "s2ft", "oft"):
        dt.save(model, tmp_path / name, names=[name])
        dt.set_active(model, name)
        ours = logits(model, minilm_batch)
        args = ["export", str(tmp_path / name), "--energy", "1.0", str(tmp_path / f"{name}_peft")]
        if name == "oft":  # a rotation's update depends on the base weight: the checkpoint alone cannot say it
            err = capsys.readouterr().err if main(args) == 2 else "exit 0"
            assert "relative to the base model's weight" in err and "--base" in err
            args += ["--base", str(tmp_path / "base.safetensors")]
        assert main(args) == 0, capsys.readouterr().err
        ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / f"{name}_peft").eval()
        torch.testing.assert_close(logits(ref, minilm_batch), ours, atol=1e-4, rtol=0, msg=name)
    # a fixed rank: the truncation's error is reported
    assert main(["export", str(tmp_path / "spiel"), "--rank", "2", str(tmp_path / "r2")]) == 0
    assert "relative error mean" in capsys.readouterr().out
    assert read_record(tmp_path / "r2").modules  # a PEFT checkpoint with rank-2 modules
    cfg = yaml.safe_load((tmp_path / "r2" / "adapter_config.json").read_text())
    assert cfg["r"] == 2


def test_combined_adapters_export_to_peft_with_matching_outputs(minilm_dir, minilm_batch, tmp_path):
    from peft import PeftModel

    model = _mixed(minilm_dir)
    dt.combine(model, ["lora", "oft"], weights=[1.0, -0.5], name="low")  # lora (query, value) + oft (query)
    dt.combine(model, ["lora", "spiel", "s2ft"], weights=[0.5, 1.0, 2.0], name="mix")
    for name, kw in (("low", {"energy": 1.0}), ("mix", {"energy": 1.0})):
        dt.set_active(model, name)
        ours = logits(model, minilm_batch)
        dt.save(model, tmp_path / name, names=[name], format="peft", **kw)
        ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / name).eval()
        torch.testing.assert_close(logits(ref, minilm_batch), ours, atol=1e-4, rtol=0, msg=name)
    # two LoRAs sum exactly as one LoRA of the summed ranks: PEFT loads it without any rank or energy
    dt.attach(model, dt.LoRA(r=2, targets=["query"]), name="lora2", activate=False)
    randomize(model, "lora2", seed=9)
    dt.combine(model, ["lora", "lora2"], weights=[1.0, 3.0], name="cat")
    dt.set_active(model, "cat")
    dt.save(model, tmp_path / "cat", names=["cat"], format="peft")
    cfg = yaml.safe_load((tmp_path / "cat" / "adapter_config.json").read_text())
    assert cfg["r"] == 6 and set(cfg["rank_pattern"].values()) == {4}  # query 4 + 2; value 4 alone
    ref = PeftModel.from_pretrained(make_minilm(minilm_dir), tmp_path / "cat").eval()
    torch.testing.assert_close(logits(ref, minilm_batch), logits(model, minilm_batch), atol=1e-5, rtol=0)
    # modules kept whole (heads) combine as whole modules, bias included: W0 + sum_i w_i (W'_i - W0)
    for i in range(2):
        dt.attach(model, dt.LoRA(r=2, targets=["query"], modules_to_save=["classifier"]), name=f"head{i}",
                  activate=False)
        randomize(model, f"head{i}", seed=20 + i)
    heads = [dt.deltas(model, f"head{i}")["classifier"] for i in range(2)]
    dt.combine(model, ["head0", "head1"], weights=[0.25, 0.75], rank=1, name="heads")
    got = dt.deltas(model, "heads")["classifier"]
    torch.testing.assert_close(got.weight, 0.25 * heads[0].weight + 0.75 * heads[1].weight)
    torch.testing.assert_close(got.bias, 0.25 * heads[0].bias + 0.75 * heads[1].bias)
    # an update relative to the base weight cannot be exported from a layer that has other adapters merged in
    dt.set_active(model, "lora")
    dt.merge(model, "lora")
    with pytest.raises(ValueError, match="merged into its weight"):
        dt.save(model, tmp_path / "bad", names=["oft"], format="peft", rank=4)


def test_merge_cli_combines_saved_adapters_like_dt_combine(minilm_dir, minilm_batch, tmp_path, capsys):
    model = _mixed(minilm_dir)
    save_file(_state(make_minilm(minilm_dir)), tmp_path / "base.safetensors")
    for name in ("lora", "spiel", "oft"):
        dt.save(model, tmp_path / name, names=[name])
    dt.combine(model, ["lora", "spiel", "oft"], weights=[1.0, -1.0, 0.5], name="want")
    dt.set_active(model, "want")
    want = logits(model, minilm_batch)
    spec = {"method": "sum", "adapters": [{"path": "lora"}, {"path": "spiel", "weight": -1.0},
                                          {"path": "oft", "weight": 0.5}],
            "base": "base.safetensors", "output": "merged", "name": "merged"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "merge.yaml")]) == 0, capsys.readouterr().err
    fresh = dt.load(make_minilm(minilm_dir), tmp_path / "merged")
    torch.testing.assert_close(logits(fresh, minilm_batch), want, atol=1e-5, rtol=0)
    # TIES re-factorized to rank 8 and written straight to PEFT
    spec.update(method="ties", density=0.3, rank=8, format="peft", output="ties")
    (tmp_path / "ties.yaml").write_text(yaml.safe_dump(spec))
    assert main(["merge", str(tmp_path / "ties.yaml")]) == 0
    assert "relative error" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "ties" / "adapter_config.json").read_text())["r"] == 8
    # bad configs say what to fix
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"adapters": ["lora"], "output": "o", "mehtod": "sum"}))
    assert main(["merge", str(tmp_path / "bad.yaml")]) == 2 and "unknown keys ['mehtod']" in capsys.readouterr().err
    (tmp_path / "nobase.yaml").write_text(yaml.safe_dump({"adapters": ["oft"], "output": "o"}))
    assert main(["merge", str(tmp_path / "nobase.yaml")]) == 2
    assert "relative to the base model's weight" in capsys.readouterr().err
    (tmp_path / "str.yaml").write_text(yaml.safe_dump({"adapters": "lora", "output": "o"}))
    assert main(["merge", str(tmp_path / "str.yaml")]) == 2 and "must be a list" in capsys.readouterr().err
    (tmp_path / "dense.yaml").write_text(yaml.safe_dump({"adapters": ["lora"], "output": "o", "method": "ties",
                                                         "format": "peft"}))
    assert main(["merge", str(tmp_path / "dense.yaml")]) == 2 and "'rank:'" in capsys.readouterr().err
