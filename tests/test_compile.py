"""torch.compile on adapted models: no graph break in the adapted layers, compiled training equals eager, and
switching or hot-loading adapters of the same shapes does not recompile."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

import deltatune as dt


def tiny_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=32)
    return BertModel(cfg)


def randomize(model, name, std, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for d in dt.deltas(model, name).values():
            for p in d.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


class Counting:
    """A dynamo backend that counts compilations and runs the captured graphs eagerly."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, inputs):
        self.graphs += 1
        return gm.forward


IDS = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_lora_model_has_no_graph_break(dropout):
    model = tiny_bert()
    dt.attach(model, dt.LoRA(r=4, dropout=dropout), name="a")  # the fused node takes x (and its dropout)
    model.train()
    explained = dynamo.explain(lambda ids: model(input_ids=ids).last_hidden_state.sum())(IDS)
    ours = [b.reason for b in explained.break_reasons if "deltatune" in str(b.user_stack)]
    assert ours == [] and explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]


def test_compiled_training_equals_eager():
    eager, comp = tiny_bert(), tiny_bert()
    for m in (eager, comp):
        dt.attach(m, dt.LoRA(r=4), name="a")
        randomize(m, "a", 0.05, seed=1)
    f = torch.compile(comp, backend="aot_eager")
    opts = [torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (eager, comp)]
    for _ in range(3):
        losses = []
        for run, opt in ((eager, opts[0]), (f, opts[1])):
            loss = run(input_ids=IDS).last_hidden_state.pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(comp.state_dict()[k], v, atol=1e-5, rtol=1e-5, msg=k)


def test_switching_and_hot_loading_adapters_of_the_same_shapes_do_not_recompile(tmp_path):
    model = tiny_bert().eval()
    for i, name in enumerate(("a", "b")):
        dt.attach(model, dt.LoRA(r=4), name=name, activate=name == "a")
        randomize(model, name, 0.1 * (i + 1), seed=i)
    backend = Counting()
    f = torch.compile(model, backend=backend)

    def agree():
        with torch.no_grad():
            torch.testing.assert_close(f(input_ids=IDS).last_hidden_state, model(input_ids=IDS).last_hidden_state)

    agree()
    first = backend.graphs
    dt.set_active(model, ["b"])
    agree()
    dt.set_active(model, ["a"])
    agree()
    dt.save(model, tmp_path / "b", names=["b"])
    dt.delete(model, "b")
    dt.load(model, tmp_path / "b")
    dt.set_active(model, ["b"])
    agree()
    assert backend.graphs == first, f"{backend.graphs - first} recompilations"
