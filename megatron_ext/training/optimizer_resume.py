"""THE one workaround for resuming megatron-core 0.19.2's distributed optimizer without apex or Transformer Engine.

Without apex/TE, ``DistributedOptimizer`` wraps torch's Adam/AdamW, which keeps Adam's step count as a tensor in each
parameter's state (apex/TE's FusedAdam keeps it in the param group). Two bugs in that branch of
``megatron/core/optimizer/distrib_optimizer.py`` break resume (megatron_core_notes.md, H100 appendix, obstacles 6-7):

1. Crash on load. ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``, which collects the ``step`` of every
   parameter state and asserts there is exactly one value; a freshly built optimizer has no state at all, so the
   set is empty and a bare ``AssertionError`` (``assert len(steps) == 1``) ends the resume.
   Fix: before that, give the optimizer its state with megatron's own helper
   ``_init_optimizer_states_with_dummy_values()`` (one zero-gradient step); the load overwrites every value.

2. Silent restart of Adam's bias correction. ``load_state_dict`` sets the right step from the saved param groups,
   but then the ``dp_reshardable`` parameter-state loader (``_set_main_param_and_optimizer_states``) copies *every*
   tensor of the state, ``step`` included, from the load template, whose ``step`` is the dummy value (1): moments
   and fp32 main parameters come back exactly, the step count does not, and losses drift from the second
   iteration after resume. That branch also puts one shared step tensor into every parameter's state.
   Fix: after the original ``load_state_dict``, give each parameter state its own ``step`` tensor holding the
   saved value from ``param_groups``.

3. Crash on load in fp32 (no ``--bf16``/``--fp16``; not apex/TE specific). There the distributed optimizer's "main"
   parameters are views of the model parameters, and ``_set_main_param_and_optimizer_states`` copies the loaded
   values into them outside ``torch.no_grad()``: "a view of a leaf Variable that requires grad is being used in an
   in-place operation". Fix: run ``load_state_dict`` under ``torch.no_grad()`` (a load never needs autograd).

4. The legacy format (``--ckpt-format torch``) loads the parameter state with ``load_parameter_state``, outside
   ``torch.no_grad()`` too (bug 3 again), after ``load_state_dict`` has given every parameter state a ``step``
   tensor that the legacy file does not hold: ``_set_main_param_and_optimizer_states`` then fails with
   ``KeyError: 'step'``. Fix: run it under ``torch.no_grad()`` and let a missing ``step`` keep the state's own
   (the value ``load_state_dict`` set from the saved param groups).

:func:`install` applies fixes 3-4 always and fixes 1-2 in the no-apex/TE configuration, where those bugs live; the
exact-resume tests ``tests/training/test_resume.py`` (both checkpoint formats) fail without them.
"""

from __future__ import annotations

import torch

_INSTALLED = False


def _saved_step(state_dict) -> float | None:
    groups = (state_dict or {}).get("optimizer", {}).get("param_groups", [])
    steps = {g["step"] for g in groups if g.get("step") is not None}
    if len(steps) > 1:
        raise RuntimeError(f"checkpoint holds different Adam steps per param group: {sorted(steps)}")
    return next(iter(steps)) if steps else None


def install() -> bool:
    """Patch ``DistributedOptimizer``'s checkpoint load (idempotent). Returns True."""
    global _INSTALLED
    from megatron.core.optimizer import distrib_optimizer

    if _INSTALLED:
        return True
    torch_adam = not distrib_optimizer.HAVE_APEX_OR_TE  # FusedAdam keeps the step in the param group: no bugs 1-2
    cls = distrib_optimizer.DistributedOptimizer
    original_sharded_state_dict = cls.sharded_state_dict
    original_load_state_dict = cls.load_state_dict

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None,
                           metadata=None):
        if torch_adam and is_loading and len(self.optimizer.state) == 0 and not self.ddp_config.use_megatron_fsdp:
            self._init_optimizer_states_with_dummy_values()  # bug 1: give state() a step to read
        if model_sharded_state_dict is None:
            model_sharded_state_dict = {}
        return original_sharded_state_dict(self, model_sharded_state_dict, is_loading, sharding_type, metadata)

    @torch.no_grad()  # bug 3
    def load_state_dict(self, state_dict):
        original_load_state_dict(self, state_dict)
        step = _saved_step(state_dict)
        if not torch_adam or step is None:
            return
        for param_state in self.optimizer.state.values():  # bug 2: one private, correct step per parameter
            if "step" in param_state:
                param_state["step"] = torch.full_like(param_state["step"], float(step))

    original_load_parameter_state = cls.load_parameter_state
    original_set_states = cls._set_main_param_and_optimizer_states

    @torch.no_grad()  # bug 3, legacy format
    def load_parameter_state(self, filename, **kwargs):
        original_load_parameter_state(self, filename, **kwargs)

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        # bug 4: None (not a tensor) makes megatron skip the copy, keeping the step that load_state_dict set.
        original_set_states(self, model_param, {"step": None, **tensors})

    load_parameter_state.__doc__ = original_load_parameter_state.__doc__
    cls.load_parameter_state = load_parameter_state
    cls._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    sharded_state_dict.__doc__ = original_sharded_state_dict.__doc__
    load_state_dict.__doc__ = original_load_state_dict.__doc__
    cls.sharded_state_dict = sharded_state_dict
    cls.load_state_dict = load_state_dict
    _INSTALLED = True
    return True
