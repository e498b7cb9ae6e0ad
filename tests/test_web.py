"""`semroute serve`: the request checks, what one request returns (against sampling each image alone), the
gate readings (against the formulas), the lock, and the page itself driven in a real headless browser."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from semroute.base import EXIT_ERROR, INT_LIMIT
from semroute.bench import bench_prompts
from semroute.checkpoint import RUN_CONFIG_FILE, resolve_checkpoint
from semroute.cli import main
from semroute.config import load_config
from semroute.web import (
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_STEPS,
    Request,
    ServedModel,
    check_request,
    example_prompts,
    respond,
    unique_names,
)
from tests.conftest import tiny_run_config

gradio = pytest.importorskip("gradio", reason="semroute[web] (gradio) is not installed")

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SIZE = 12  # the tiny runs' image size


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Finished tiny runs: S2 (time-independent), S1 whose gates read an estimated noise level, plain S1."""
    root = tmp_path_factory.mktemp("web")
    found = {}
    kinds = (("s2", "depth", {}), ("s1", "time", {"gate_signal": "estimated"}), ("s1n", "time", {}))
    for name, strategy, model in kinds:
        raw = tiny_run_config(tiny_llama_dir, strategy=strategy, max_steps=4)
        raw["model"].update(model)
        config = root / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        assert main(["train", "--config", str(config), "--out", str(root / name), "--device", "cpu"]) == 0
        found[name] = root / name
    return found


@pytest.fixture(scope="module")
def models(runs, tmp_path_factory) -> list[ServedModel]:
    figures = tmp_path_factory.mktemp("figures")
    return [ServedModel.load(runs[name], "cpu", "fp32", figures / name) for name in ("s2", "s1")]


# ------------------------------------------------------------------ the request's bounds

BAD_REQUESTS = {
    "empty prompt": (("", 0, 4, 2.0, 1), "the prompt is empty"),
    "blank prompt": (("  \n\t", 0, 4, 2.0, 1), "the prompt is empty"),
    "no prompt": ((None, 0, 4, 2.0, 1), "the prompt is empty"),
    "long prompt": (("a" * (MAX_PROMPT_CHARS + 1), 0, 4, 2.0, 1), f"at most {MAX_PROMPT_CHARS}"),
    "negative seed": (("a", -1, 4, 2.0, 1), "seed must be in 0.."),
    "huge seed": (("a", INT_LIMIT + 1, 4, 2.0, 1), "seed must be in 0.."),
    "fractional seed": (("a", 1.5, 4, 2.0, 1), "seed must be a whole number"),
    "seed as text": (("a", "x", 4, 2.0, 1), "seed must be a whole number"),
    "nan steps": (("a", 0, float("nan"), 2.0, 1), "steps must be a whole number"),
    "zero steps": (("a", 0, 0, 2.0, 1), "steps must be in 1.."),
    "too many steps": (("a", 0, MAX_STEPS + 1, 2.0, 1), f"steps must be in 1..{MAX_STEPS}"),
    "guidance below 1": (("a", 0, 4, 0.5, 1), "guidance must be >= 1"),
    "infinite guidance": (("a", 0, 4, float("inf"), 1), "guidance must be >= 1"),
    "absurd guidance": (("a", 0, 4, MAX_GUIDANCE + 1, 1), f"at most {MAX_GUIDANCE:g}"),
    "guidance as text": (("a", 0, 4, "much", 1), "guidance must be a number"),
    "no images": (("a", 0, 4, 2.0, 0), "images must be in 1..8"),
    "more images than the cap": (("a", 0, 4, 2.0, 9), "images must be in 1..8"),
    "a billion images": (("a", 0, 4, 2.0, 10**9), "images must be in 1..8"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_are_refused_naming_the_field(case):
    values, message = BAD_REQUESTS[case]
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        check_request(*values, max_images=8)


def test_a_good_request_comes_back_as_values():
    # Sliders and number boxes send floats; whole ones are accepted as ints; the prompt is stripped.
    assert check_request(" two red squares \n", 7.0, "12", 3, 2.0, max_images=2) == Request(
        "two red squares", 7, 12, 3.0, 2
    )
    assert check_request("a", INT_LIMIT, MAX_STEPS, MAX_GUIDANCE, 8).seed == INT_LIMIT


# ------------------------------------------------------------------ one request, every model


def test_a_request_gives_each_model_its_images_each_from_its_own_seed(models):
    request = Request("two red squares", seed=11, steps=3, guidance=2.0, images=3)
    seen = []
    reply = respond(models, request, lambda done, total, what: seen.append((done, total)))
    assert seen == [(k, 2 * 3) for k in range(1, 7)]  # progress: every step of every model, in order
    assert len(reply.galleries) == 2 and "3 images per checkpoint from seed 11" in reply.status
    for model, gallery in zip(models, reply.galleries, strict=True):
        assert [caption for _, caption in gallery] == ["seed 11", "seed 12", "seed 13"]
        for k, (image, _) in enumerate(gallery):
            assert image.size == (SIZE, SIZE)
            # The reference: that image sampled alone from its seed, as `semroute sample --seed` would.
            alone = model.pipeline.generate([request.prompt], 3, 2.0, seed=[11 + k])[0]
            expected = (alone.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            got = torch.tensor(list(image.getdata())).view(SIZE, SIZE, 3).numpy()
            assert abs(got.astype(int) - expected.astype(int)).max() <= 1
    # Two different seeds draw different images (the seed is not ignored).
    first = [list(im.getdata()) for im, _ in reply.galleries[0]]
    assert first[0] != first[1]


def test_gate_readings_follow_the_schedule_the_shift_and_the_noise_head(models, runs, tmp_path):
    s2, s1 = models
    request = Request("one blue circle", seed=3, steps=4, guidance=1.0, images=2)
    flat = s2.sample(request)
    assert flat.figure is None and flat.readings == []  # time-independent: one routing for every step
    estimated = s1.sample(request)
    schedule = [float(t) / 1000 for t in _timesteps(s1, 4)]
    assert estimated.nominal == pytest.approx(schedule)
    # The first state is the noise itself: the head's reading of it, computed here from the seeds.
    head = s1.pipeline.transformer.noise_head
    shape = (s1.pipeline.transformer.config["in_channels"], SIZE, SIZE)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    assert estimated.readings[0] == pytest.approx(float(head(noise).mean()), abs=1e-5)
    assert estimated.figure is not None and Image.open(estimated.figure).size[0] > 400

    # Nominal gates with a gate shift read s t / (1 + (s - 1) t) of the schedule's t.
    nominal = ServedModel.load(runs["s1n"], "cpu", "fp32", tmp_path / "nominal")
    unshifted = nominal.sample(request)
    assert unshifted.nominal == pytest.approx(schedule)
    assert unshifted.readings == pytest.approx(schedule)
    nominal.pipeline.use_gate_shift(3.0)
    shifted = nominal.sample(request)
    assert shifted.readings == pytest.approx([3 * t / (1 + 2 * t) for t in shifted.nominal])


def _timesteps(model: ServedModel, steps: int) -> list[float]:
    scheduler = type(model.pipeline.scheduler).from_config(model.pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.tolist()


def test_one_request_at_a_time_per_model(models):
    model = models[0]
    inside, most = 0, 0
    original = model.pipeline.generate

    def counting(*args, **kwargs):
        nonlocal inside, most
        inside += 1
        most = max(most, inside)
        time.sleep(0.05)
        try:
            return original(*args, **kwargs)
        finally:
            inside -= 1

    model.pipeline.generate = counting  # type: ignore[method-assign]
    try:
        request = Request("a", 0, 2, 1.0, 1)
        threads = [threading.Thread(target=model.sample, args=(request,)) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        del model.pipeline.generate
    assert most == 1


def test_examples_are_the_prompts_the_checkpoint_was_made_for(models, runs):
    config = load_config(resolve_checkpoint(runs["s2"]) / RUN_CONFIG_FILE)
    shapes = {p.text for p in bench_prompts(config.data)}
    examples = example_prompts(models[0].pipeline, runs["s2"])
    assert examples and set(examples) <= shapes and len(set(examples)) == len(examples)


def test_models_of_the_same_name_are_told_apart(models):
    a, b = models
    names = a.name, b.name
    try:
        a.name = b.name = "step_000004"
        unique_names([a, b])
        assert (a.name, b.name) == ("step_000004 (1)", "step_000004 (2)")
    finally:
        a.name, b.name = names


# ------------------------------------------------------------------ the command


def test_serve_without_gradio_is_one_line_naming_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["serve", "--checkpoint", str(runs["s2"])]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "pip install 'semroute[web]'" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "70000"], "must be a TCP port in 0..65535"),
        (["--max-images", "0"], "must be >= 1"),
        (["--max-images", "65"], "--max-images must be in 1..64"),
    ],
)
def test_serve_refuses_bad_flags(runs, flags, message, capsys):
    code = None
    try:
        code = main(["serve", "--checkpoint", str(runs["s2"]), *flags])
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    assert code not in (0, None)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ the page, served


@pytest.fixture(scope="module")
def server(runs):
    from semroute.web import serve

    app = serve([runs["s2"], runs["s1"]], "cpu", "fp32", port=0, max_images=4, block=False)
    yield app
    app.close()


@pytest.fixture(scope="module")
def page_server(runs):
    """The browser test's server: the tiny runs, or SEMROUTE_SERVE_CHECKPOINTS (paths joined by the OS's
    path separator), which is how the README's screenshot was taken of trained checkpoints."""
    from semroute.web import serve

    chosen = os.environ.get("SEMROUTE_SERVE_CHECKPOINTS")
    paths = [Path(p) for p in chosen.split(os.pathsep)] if chosen else [runs["s2"], runs["s1"]]
    app = serve(paths, "cpu", "fp32", port=0, max_images=4, block=False)
    yield app
    app.close()


def test_the_page_answers_through_its_api(server):
    from gradio_client import Client

    client = Client(server.local_url, verbose=False)
    *galleries, gate_s2, gate_s1, status = client.predict(
        "two red squares", 5, 3, 2.0, 2, api_name="/generate"
    )
    assert [len(g) for g in galleries] == [2, 2]
    assert all(Image.open(item["image"]).size == (SIZE, SIZE) for g in galleries for item in g)
    assert gate_s2 is None and Image.open(gate_s1).size[0] > 400
    assert "2 images per checkpoint from seed 5" in status
    with pytest.raises(Exception, match="the prompt is empty"):
        client.predict("   ", 5, 3, 2.0, 2, api_name="/generate")
    # Still answering after the refusal.
    *galleries, _, _, status = client.predict("one blue circle", 6, 2, 1.0, 1, api_name="/generate")
    assert [len(g) for g in galleries] == [1, 1] and "from seed 6" in status


CHROMIUM_FLAGS = (  # what a closed network and a root user need (see the machine's notes)
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1300",
)


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and CHROMEDRIVER):
        why = "no chromium/chromedriver: `make browser` installs Debian's chromium and chromium-driver"
        if os.environ.get("SEMROUTE_REQUIRE_BROWSER"):  # CI sets it: there the test must run, not skip
            pytest.fail(why)
        pytest.skip(why)
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # selenium must not look for drivers on the network
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"the page never showed {what} within {timeout:.0f} s")


def test_the_page_in_a_real_browser(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def find(selector: str) -> list:
        return browser.find_elements(By.CSS_SELECTOR, selector)

    def retype(selector: str, text: str) -> None:
        box = wait_for(lambda: find(selector), selector)[0]
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.DELETE)
        if text:
            box.send_keys(text)
        box.send_keys(Keys.TAB)  # commits a number box's value

    def status() -> str:
        return " ".join(e.text for e in find("#status"))

    def images(selector: str) -> list[tuple[int, int]]:
        return [
            (int(e.get_attribute("naturalWidth")), int(e.get_attribute("naturalHeight")))
            for e in find(selector)
            if int(e.get_attribute("naturalWidth") or 0) > 0
        ]

    served = page_server.served_models
    browser.get(page_server.local_url)
    retype("#prompt textarea", "two red squares")
    retype("#count input[type=number]", "3")
    retype("#seed input", "21")
    assert not find("#images-0 img")  # nothing drawn before the button is pressed
    find("#generate")[0].click()
    wait_for(lambda: "3 images per checkpoint from seed 21" in status(), "the status of the request")
    for i, model in enumerate(served):  # every checkpoint, side by side: 3 images each, at its size
        assert wait_for(lambda i=i: len(images(f"#images-{i} img")) == 3, "3 images")
        assert set(images(f"#images-{i} img")) == {(model.image_size, model.image_size)}
        assert wait_for(lambda i=i: images(f"#routing-{i} img"), "the routing figure")[0][0] > 300
        if model.time_gated:  # S1: what its gates read along this request's steps
            assert wait_for(lambda i=i: images(f"#gates-{i} img"), "the gate readings")[0][0] > 400
        else:  # S2 has no time gates: nothing to draw there
            assert not find(f"#gates-{i} img")
    if not os.environ.get("SEMROUTE_SERVE_CHECKPOINTS"):
        assert [(m.time_gated, m.image_size) for m in served] == [(False, SIZE), (True, SIZE)]
    shot = tmp_path / "serve.png"
    browser.save_screenshot(str(shot))
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("SEMROUTE_SCREENSHOT"):  # the README's picture: SEMROUTE_SCREENSHOT=docs/serve.png
        shutil.copy(shot, os.environ["SEMROUTE_SCREENSHOT"])

    # A bad request: an error on the page, and the server goes on answering.
    retype("#prompt textarea", "")
    find("#generate")[0].click()
    wait_for(
        lambda: any("the prompt is empty" in e.text for e in find("[data-testid='toast-text']")),
        "the error for an empty prompt",
    )
    retype("#prompt textarea", "one blue circle")
    retype("#seed input", "22")
    find("#generate")[0].click()
    wait_for(lambda: "from seed 22" in status(), "the next request's status after the error")
