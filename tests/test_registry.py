"""The adapter registry and its listeners: plugins (serving, save_pretrained) hook in without the model layer
knowing them, and a model that is never served carries only the one hook that accepts ``adapter_names``."""
from __future__ import annotations

import torch
from torch import nn

import deltatune as dt
from deltatune import registry, serving


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _hooks(model):
    return list(model._forward_pre_hooks.values()), list(model._forward_hooks.values())


def test_listeners_hear_the_first_attach_switches_deletes_and_the_last_adapter():
    heard = []
    added = [(getattr(registry, name), lambda *args, name=name: heard.append((name, args[1:])))
             for name in ("ON_CREATE", "ON_CLOSE", "BEFORE_SWITCH", "ON_DELETE")]
    for listeners, listener in added:  # the lists themselves: the model layer holds them by identity
        listeners.append(listener)
    try:
        _drive_and_check(heard)
    finally:
        for listeners, listener in added:
            listeners.remove(listener)


def _drive_and_check(heard):
    net = _net()
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="a")
    dt.attach(net, dt.LoRA(r=2, targets=["2"]), name="b")
    assert [h[0] for h in heard] == ["ON_CREATE"]  # once per model, not per adapter
    dt.set_active(net, ["a", "b"])
    dt.delete(net, "a")
    dt.unload(net)
    assert [h[0] for h in heard] == ["ON_CREATE", "BEFORE_SWITCH", "ON_DELETE", "ON_CLOSE"]
    assert heard[2][1] == ("a",)


def test_an_unserved_model_carries_one_cheap_hook_and_a_routed_call_leaves_nothing_behind():
    net = _net()
    dt.attach(net, dt.LoRA(r=2, targets=["0", "2"]), name="a")
    dt.attach(net, dt.LoRA(r=2, targets=["0", "2"]), name="b", activate=False)
    for name in ("a", "b"):
        for d in dt.deltas(net, name).values():
            torch.nn.init.normal_(d.B, std=0.1)
    pre, post = _hooks(net)
    # serving's routing hook, and the pair that hands per-sample conditions to deltas (deltatune.conditioning)
    assert sorted(f"{h.__module__}.{h.__name__}" for h in pre) == ["deltatune.conditioning._enter",
                                                                   "deltatune.serving._enter"]
    assert [f"{h.__module__}.{h.__name__}" for h in post] == ["deltatune.conditioning._leave"]
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for _, layer in registry.adapted_layers(net))
    x = torch.randn(4, 8)
    net.eval()
    with torch.no_grad():
        mixed = net(x, adapter_names=["a", "b", "base", "a"])
        assert len(_hooks(net)[1]) == 1 and not net.__dict__.get("_deltatune_rows")  # the leaving hook removed itself
        for i, name in enumerate(["a", "b", None, "a"]):
            with dt.adapter_rows(net, [name]):
                torch.testing.assert_close(mixed[i:i + 1], net(x[i:i + 1]))
    assert "serving" in registry.registry(net).extras  # its state lives with the plugin, not in the registry
    dt.unload(net)
    pre, post = _hooks(net)
    assert [getattr(h, "__name__", "") for h in pre] == ["_refuse_names"] and not post


def test_override_active_changes_the_layers_only_for_the_block():
    net = _net()
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="a")
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="b", activate=False)
    dt.set_active(net, ["a", "b"], trainable="b")
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    layer = net[0]
    with dt.model.override_active(net, ["a"]):
        assert layer.applied == ("a",) and [d for d in layer._live] == [layer.deltas["a"]]
        assert dt.active_adapters(net) == ["a", "b"]
        with dt.model.override_active(net, []):  # blocks nest
            assert layer.applied == () and not layer._live
        assert layer.applied == ("a",)
    assert layer.applied == ("a", "b") and len(layer._live) == 2
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert registry.registry(net).trainable == ["b"]


def test_serving_is_not_imported_by_the_model_layer():
    """The model layer reaches serving only through the registry's listeners (import-linter checks the imports;
    here: the listeners really are serving's)."""
    assert serving.open_hooks in registry.ON_CREATE and serving.close_hooks in registry.ON_CLOSE
    assert serving._release_serving_merge in registry.BEFORE_SWITCH


def test_set_active_inside_disabled_keeps_the_base_and_applies_after_the_block():
    net = _net()
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="a")
    dt.attach(net, dt.LoRA(r=2, targets=["0"]), name="b", activate=False)
    for name in ("a", "b"):
        torch.nn.init.normal_(dt.deltas(net, name)["0"].B, std=0.1)
    x = torch.randn(3, 8)
    net.eval()
    with torch.no_grad(), dt.disabled(net):
        base = net(x)
        dt.set_active(net, ["b"])
        torch.testing.assert_close(net(x), base)  # still the plain base inside the block
    assert net[0].applied == ("b",) and dt.active_adapters(net) == ["b"]
    with torch.no_grad():
        with dt.adapter_rows(net, ["b"]):
            only_b = net(x)
        assert not torch.allclose(only_b, base)
        torch.testing.assert_close(net(x), only_b)  # the registry and the layers agree after the block
