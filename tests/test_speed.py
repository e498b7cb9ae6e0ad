"""Speed choices: made on the machine, cached, recorded;
and every fast path computes what the plain one does."""

from __future__ import annotations

import json
import math

import pytest
import torch

from semroute import attention as attn
from semroute import runtime, speed
from semroute.attention import AttentionChoice, cross_mask, joint_mask
from semroute.blocks import RMSNorm, _RMSNormFunction
from semroute.config import load_config
from semroute.features import PromptFeatures, drop_captions
from semroute.train import train

from .conftest import tiny_run_config

CHOICES = [
    AttentionChoice(b, m, s) for b in attn.ATTENTION_BACKENDS for m in attn.MASK_FORMS for s in (True, False)
]


def explicit_attention(q, k, v, keep):
    """softmax(q k^T / sqrt(d)) v with the masked keys left out, one row at a time."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize(
    "choice", CHOICES, ids=lambda c: f"{c.backend}-{c.mask}-{'skip' if c.skip_unpadded else 'keep'}"
)
def test_every_kernel_and_mask_form_computes_the_same_attention(choice):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 7, 8), torch.randn(3, 2, 7, 8)
    padded = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
    full = torch.ones(3, 7, dtype=torch.bool)
    previous = attn.current_attention()
    attn.use_attention(choice)
    try:
        for keep in (padded, full):
            mask = cross_mask(keep)
            assert (mask is None) == (choice.skip_unpadded and bool(keep.all()))
            if mask is not None:
                assert mask.dtype == (torch.bool if choice.mask == "bool" else torch.float32)
                assert mask.shape == (3, 1, 1, 7)
            torch.testing.assert_close(
                attn.attention(q, k, v, mask), explicit_attention(q, k, v, keep), rtol=1e-5, atol=1e-5
            )
    finally:
        attn.use_attention(previous)


def test_the_joint_mask_keeps_every_image_token():
    keep = torch.tensor([[True, False], [True, True]])
    for form in attn.MASK_FORMS:
        mask = joint_mask(keep, 3, AttentionChoice(mask=form))
        kept = mask if mask.dtype == torch.bool else mask == 0
        assert kept.shape == (2, 1, 1, 5)
        assert kept[:, 0, 0].tolist() == [[True, False, True, True, True], [True] * 5]
    # Nothing padded: no mask at all where the choice skips unpadded masks, an all-True one where it does not
    # (explicit choices: the process-wide one is whatever this machine's probe measured).
    unpadded = torch.ones(2, 2, dtype=torch.bool)
    assert joint_mask(unpadded, 3, AttentionChoice(skip_unpadded=True)) is None
    assert bool(joint_mask(unpadded, 3, AttentionChoice(skip_unpadded=False)).all())


def test_the_attention_choice_is_measured_once_cached_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMROUTE_CACHE", str(tmp_path))
    calls = []
    real = speed.measure_attention

    def measure(device, rounds=5):
        calls.append(device)
        return real(device, rounds=1)

    monkeypatch.setattr(speed, "measure_attention", measure)
    cpu = torch.device("cpu")
    first = speed.attention_choice(cpu)
    again = speed.attention_choice(cpu)
    assert len(calls) == 1 and first.value == again.value
    assert first.value.backend in attn.ATTENTION_BACKENDS and "this CPU" in first.reason
    cached = json.loads((tmp_path / runtime.PROBE_FILE).read_text())[runtime.machine_key(cpu)]["attention"]
    assert cached["backend"] == first.value.backend and set(cached["seconds"]) >= {
        "default/bool",
        "math/bool",
    }
    # A cached entry that is not a valid choice is never believed: it is measured again and rewritten.
    path = tmp_path / runtime.PROBE_FILE
    forged = json.loads(path.read_text())
    forged[runtime.machine_key(cpu)]["attention"] = {
        "backend": "flash9",
        "mask": "bool",
        "skip_unpadded": True,
        "seconds": {},
    }
    path.write_text(json.dumps(forged))
    assert speed.attention_choice(cpu).value.backend in attn.ATTENTION_BACKENDS and len(calls) == 2
    # Other devices take PyTorch's own selection, unmeasured.
    assert speed.attention_choice(torch.device("meta")).value == AttentionChoice() and len(calls) == 2


def test_the_probe_prefers_the_library_default_unless_another_form_is_clearly_faster(monkeypatch):
    fake = {"default/bool": 1.0, "default/additive": 0.95, "math/bool": 2.0, "math/additive": 2.0}

    def timed(choice, tensors, padded):
        if not padded:
            return 1.0 if not choice.skip_unpadded else 0.5
        return fake[f"{choice.backend}/{choice.mask}"]

    monkeypatch.setattr(speed, "_time_attention", timed)
    chosen = speed.measure_attention(torch.device("cpu"), rounds=2)
    assert (chosen["backend"], chosen["mask"], chosen["skip_unpadded"]) == ("default", "bool", True)
    fake["math/additive"] = 0.5  # clearly faster: taken
    chosen = speed.measure_attention(torch.device("cpu"), rounds=2)
    assert (chosen["backend"], chosen["mask"]) == ("math", "additive")


def test_rmsnorm_fast_forward_equals_the_autograd_one():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 9, 16, dtype=torch.float64)
    norm = norm.double()
    with torch.no_grad():
        fast = norm(x)
    reference = x / x.square().mean(-1, keepdim=True).add(1e-6).sqrt() * norm.weight
    torch.testing.assert_close(fast, reference)
    torch.testing.assert_close(_RMSNormFunction.apply(x, norm.weight, 1e-6), reference)


def test_selected_features_are_layer_major_and_dropout_writes_only_dropped_rows():
    hidden, mask = torch.randn(5, 3, 4, 2), torch.rand(5, 4) > 0.3
    features = PromptFeatures(hidden, mask)
    ids = torch.tensor([4, 0, 0, 2])
    text, m = features.select(ids)
    assert (
        text.is_contiguous() and torch.equal(text, hidden[ids].transpose(0, 1)) and torch.equal(m, mask[ids])
    )
    null_text, null_mask = torch.randn(3, 4, 2), torch.tensor([True, True, False, False])
    before = text.clone()
    out, out_mask = drop_captions(
        text, m.clone(), null_text, null_mask, torch.tensor([False, True, False, False])
    )
    assert torch.equal(out[:, [0, 2, 3]], before[:, [0, 2, 3]]) and torch.equal(out[:, 1], null_text)
    assert torch.equal(out_mask[1], null_mask)
    # Nothing dropped: the tensors come back as they were.
    same, _ = drop_captions(before, m, null_text, null_mask, torch.zeros(4, dtype=torch.bool))
    assert same is before


class FakeBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(2))


def compiler(monkeypatch, mode, cost=None, cxx="g++"):
    monkeypatch.setattr(speed, "stored_measurement", lambda device, name, valid: cost)
    monkeypatch.setattr(speed, "store_measurement", lambda device, name, value: None)
    monkeypatch.setattr(speed, "cpp_compiler", lambda: cxx)
    return speed.StepCompiler(FakeBlocks(), mode, torch.device("cpu"))


def feed(c, times, steps_left):
    for i, t in enumerate(times):
        c.observe(t, steps_left - i)


def compiled_blocks(c):
    return ["forward" in vars(block) for block in c.model.blocks]


def test_auto_compiles_only_a_run_long_enough_to_pay_it_back(monkeypatch):
    c = compiler(monkeypatch, "auto", cost=100.0)
    feed(c, [1.0] * (speed.WARM_STEPS + speed.TIMED_STEPS), steps_left=300)  # 300 s left < 5 x 100 s
    assert c.phase == "done" and not c.used and compiled_blocks(c) == [False, False]
    assert "too short to pay it back" in c.record()["reason"]
    c = compiler(monkeypatch, "auto", cost=100.0)
    feed(c, [1.0] * (speed.WARM_STEPS + speed.TIMED_STEPS), steps_left=5000)
    assert c.compiling and compiled_blocks(c) == [True, True]
    c.observe(40.0, 4000)  # the first compiled step: the compile cost
    feed(c, [0.7] * (1 + speed.TIMED_STEPS), steps_left=3999)
    record = c.record()
    assert (
        c.used
        and record["first_call_s"] == 40.0
        and record["compiled_step_s"] == 0.7
        and "kept" in record["reason"]
    )


def test_auto_drops_a_compiled_run_that_is_not_faster_and_on_keeps_it(monkeypatch):
    for mode, kept in (("auto", False), ("on", True)):
        c = compiler(monkeypatch, mode, cost=1.0)
        feed(c, [1.0] * (speed.WARM_STEPS + speed.TIMED_STEPS), steps_left=5000)
        c.observe(30.0, 4000)
        feed(c, [0.99] * (1 + speed.TIMED_STEPS), steps_left=3999)
        assert c.used is kept and compiled_blocks(c) == [kept, kept]


def test_no_compiler_or_a_failing_one_runs_eager_in_one_line(monkeypatch):
    c = compiler(monkeypatch, "auto", cost=1.0, cxx=None)
    feed(c, [1.0] * (speed.WARM_STEPS + speed.TIMED_STEPS), steps_left=5000)
    assert not c.used and "no C++ compiler found" in c.reason and "g++" in c.reason
    c = compiler(monkeypatch, "on")
    feed(c, [1.0] * (speed.WARM_STEPS + speed.TIMED_STEPS), steps_left=10)
    assert c.compiling
    c.failed(RuntimeError("InductorError: CppCompileError:\n  cc1plus: fatal error"))
    assert compiled_blocks(c) == [False, False] and not c.used and "\n" not in c.reason
    with pytest.raises(ValueError, match="compile must be one of auto, on, off, got 'sometimes'"):
        speed.StepCompiler(FakeBlocks(), "sometimes", torch.device("cpu"))


def test_train_compile_reads_yaml_booleans_and_refuses_other_words(tiny_llama_dir):
    for value, expected in ((True, "on"), (False, "off"), ("auto", "auto")):
        assert load_config(tiny_run_config(tiny_llama_dir, compile=value)).train.compile == expected
    with pytest.raises(ValueError, match="train.compile must be one of auto, on, off, got 'fast'"):
        load_config(tiny_run_config(tiny_llama_dir, compile="fast"))
    with pytest.raises(ValueError, match="train.compile must be of type str or bool, got 5"):
        load_config(tiny_run_config(tiny_llama_dir, compile=5))


def test_a_compiled_run_trains_records_its_choices_and_samples_like_eager(
    tiny_llama_dir, tiny_encoder, tmp_path
):
    """A real torch.compile of the tiny DiT's blocks: the choice and its measurements land in summary.json."""
    config = load_config(tiny_run_config(tiny_llama_dir, compile="on", max_steps=14, checkpoint_every=14))
    result = train(config, tmp_path / "run", progress=False, encoder=tiny_encoder)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    compiled = summary["speed"]["compile"]
    assert compiled["used"] and compiled["first_call_s"] > 0 and compiled["eager_step_s"] > 0
    assert compiled["compiled_step_s"] > 0 and "compile is on" in compiled["reason"]
    assert (
        summary["speed"]["attention"]["backend"] in attn.ATTENTION_BACKENDS
        and summary["speed"]["threads"] >= 1
    )
    assert math.isfinite(summary["final_loss"])
    # The trained model, still compiled, predicts what its blocks predict eagerly.
    model = result.model.eval()
    assert all("forward" in vars(block) for block in model.blocks)
    x, t = torch.randn(2, 3, 12, 12), torch.rand(2)
    text = torch.randn(model.config.num_text_layers, 2, 5, model.config.text_dim)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        compiled_out = model(x, t, text, mask)
        for block in model.blocks:
            del block.forward
        torch.testing.assert_close(compiled_out, model(x, t, text, mask), rtol=1e-4, atol=1e-5)


def _eager_then_compiled(tiny_encoder, monkeypatch, fake_compile):
    """A tiny pipeline sampled eager, then with compile on and torch.compile replaced by `fake_compile`.
    Returns (pipeline, eager images, compiled images, draw: samples the same job again)."""
    from semroute.bench.sampling import sample_all

    from .test_pipeline import make_pipeline

    monkeypatch.setattr(speed.torch, "compile", fake_compile)
    monkeypatch.setattr(speed, "store_measurement", lambda device, name, value: None)
    prompts = ["one red square", "two blue circles", "one blue circle"]
    pipe = make_pipeline(tiny_encoder, "depth")

    def draw():
        return sample_all(pipe, prompts, 3, steps=12, guidance_scale=2.0, batch_size=4, progress=False)

    eager = draw()
    pipe.compile = "on"
    return pipe, eager, draw(), draw


def test_the_batched_sampler_compiles_full_batches_only_and_hands_the_pipeline_back_eager(
    tiny_encoder, monkeypatch
):
    """The plumbing with torch.compile replaced by a counting pass-through (the real one is tested above)."""
    wrapped, calls = [], []

    def fake_compile(fn):
        wrapped.append(fn)

        def run(*args, **kwargs):
            calls.append(len(args[0]))  # the batch each compiled call sees
            return fn(*args, **kwargs)

        return run

    pipe, eager, compiled, draw = _eager_then_compiled(tiny_encoder, monkeypatch, fake_compile)
    blocks = len(pipe.transformer.blocks)
    assert len(wrapped) == blocks  # compiled once, after the eager steps were timed
    # 9 images in batches of 4, 4, 1: only the full batches (8 rows with guidance) ran compiled.
    assert calls and set(calls) == {8}
    assert all("forward" not in vars(block) for block in pipe.transformer.blocks)  # handed back eager
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    pipe.compile = "off"
    calls.clear()
    draw()
    assert not calls


def test_the_eta_is_measured_on_the_steps_after_a_compile(monkeypatch):
    """A compile's long first step must not enter the
    time-left estimate (it once read 6 h for a 30 min run)."""
    from semroute import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    reports = []
    pace = progress.Pace(0, 1000, None, lambda per_step, left: reports.append((per_step, left)))
    step = 0

    def run(seconds, n):
        nonlocal step
        for _ in range(n):
            clock[0] += seconds
            step += 1
            pace.update(step)

    run(1.0, 3)
    clock[0] += 60.0  # the first compiled step
    step += 1
    pace.restart(step)
    pace.update(step)
    run(0.5, progress.Pace.WARMUP + progress.Pace.MEASURED)
    assert reports == [(0.5, (1000 - step) * 0.5)]


class _FailsInBackward(torch.autograd.Function):
    """Identity forward whose backward raises, as inductor's stride assertions do on a shape it got wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("expected size 32==32, stride 2688==2880 at dim=0")


def test_a_compiled_step_that_fails_later_is_redone_eager_and_trains_exactly_like_eager(
    tiny_llama_dir, tiny_encoder, tmp_path, monkeypatch
):
    """Not only the first compiled step may fail: a later batch of a new shape once made inductor's
    backward raise mid-run, which killed a 500-step run. The failing optimizer step is redone eagerly
    from the same gradients (none), accumulation count and random draws, so the run ends bit-identical to
    one that never compiled. The failure is on the first micro-step of an accumulated step (redone without
    putting accelerate's count back, that micro-step would sync alone), mid-backward, after later blocks
    have already accumulated gradients."""
    monkeypatch.setattr(speed, "store_measurement", lambda device, name, value: None)
    calls = []

    def fake_compile(fn):
        def run(*args, **kwargs):
            out = fn(*args, **kwargs)
            if fn.__self__ is first_block[0]:
                calls.append(1)
                if len(calls) == 5:  # the first micro-step of step 13 (the third compiled one)
                    return _FailsInBackward.apply(out)
            return out

        return run

    first_block = [None]
    settings = dict(max_steps=16, checkpoint_every=16, gradient_accumulation_steps=2, batch_size=8)
    eager = train(
        load_config(tiny_run_config(tiny_llama_dir, compile="off", **settings)),
        tmp_path / "eager",
        progress=False,
        encoder=tiny_encoder,
    )
    monkeypatch.setattr(speed.torch, "compile", fake_compile)
    original = speed.StepCompiler._compile

    def remember_first_block(self, on):
        first_block[0] = self._blocks()[0]
        original(self, on)

    monkeypatch.setattr(speed.StepCompiler, "_compile", remember_first_block)
    failed = train(
        load_config(tiny_run_config(tiny_llama_dir, compile="on", **settings)),
        tmp_path / "failed",
        progress=False,
        encoder=tiny_encoder,
    )
    assert len(calls) == 5  # it did run compiled, failed on the fifth call, then ran eager to the end
    record = json.loads((tmp_path / "failed" / "summary.json").read_text())["speed"]["compile"]
    assert not record["used"] and "torch.compile failed, running eager" in record["reason"]
    assert "stride 2688==2880" in record["reason"]
    assert all("forward" not in vars(block) for block in failed.model.blocks)
    for (name, a), (_, b) in zip(
        eager.model.state_dict().items(), failed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_sampling_batch_whose_compiled_blocks_raise_is_drawn_again_eager(tiny_encoder, monkeypatch):
    """The sampler's counterpart: the batch being drawn when compiled blocks raise is drawn again eager,
    the same images as an eager sampler's, and the rest of the job runs eager."""
    calls = []

    def fake_compile(fn):
        def run(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise AssertionError("expected size 8==8, stride 96==80 at dim=0")
            return fn(*args, **kwargs)

        return run

    pipe, eager, redrawn, _ = _eager_then_compiled(tiny_encoder, monkeypatch, fake_compile)
    assert len(calls) == 3  # compiled calls ran until one raised; none after
    torch.testing.assert_close(redrawn, eager, rtol=0, atol=0)
    assert all("forward" not in vars(block) for block in pipe.transformer.blocks)
