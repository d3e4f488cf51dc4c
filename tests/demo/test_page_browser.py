"""The page in a real browser: Debian's chromium (headless, driven by Playwright) against the page,
which talks to the session's real gateway. Screenshots go to test-output/demo/ (ignored by git);
the classify one is the README's picture, copied to docs/figures/demo-classify.png only when
asked: `LORASTACK_UPDATE_FIGURES=1 .venv/bin/pytest tests/demo/test_page_browser.py`."""

from __future__ import annotations

import csv
import re
import time

import pytest
from demo_helpers import OUTPUT, save_figure
from playwright.sync_api import expect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

REVIEW = "This medicine works great, my pain is gone and I had no side effects."


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def _toast(page):
    return page.locator(".toast-body").last


def test_classify_shows_every_label_and_the_prediction(page, gateway):
    page.locator("#cls_text textarea").fill(REVIEW)
    page.locator("#cls_btn").click()
    expect(page.locator("#cls_pred")).to_contain_text("Predicted:", timeout=120_000)
    probs = page.locator("#cls_probs")
    for label in gateway.labels:
        expect(probs).to_contain_text(label)
    assert probs.inner_text().count("%") >= len(gateway.labels)  # one bar per label
    predicted = page.locator("#cls_pred").inner_text()
    assert any(f"Predicted: {label}" in predicted for label in gateway.labels), predicted
    shot = OUTPUT / "demo-classify.png"
    page.screenshot(path=shot, full_page=True)
    save_figure(shot, "demo-classify.png")


def test_examples_fill_the_text_and_errors_are_readable(page):
    page.get_by_text("Terrible side effects", exact=False).first.click()
    expect(page.locator("#cls_text textarea")).to_have_value(
        "Terrible side effects: it made me sick for a week and did not help.")
    page.locator("#cls_text textarea").fill("   ")
    page.locator("#cls_btn").click()
    expect(_toast(page)).to_contain_text("type or paste a text to classify")
    assert "Traceback" not in page.content()


def test_generation_streams_into_the_page(page):
    _tab(page, "Generate")
    # the gateway of the tests allows 64 tokens: the slider's 96 gets its readable 400
    page.locator("#gen_in textarea").fill("Tell me about the weather.")
    page.locator("#gen_btn").click()
    expect(_toast(page)).to_contain_text("the limit is 64")
    # the failed turn is taken back, the message is given back to edit and resend
    expect(page.locator("#gen_chat [data-testid=user]")).to_have_count(0)
    expect(page.locator("#gen_in textarea")).to_have_value("Tell me about the weather.")
    page.locator("#gen_max input[type=number]").fill("48")
    page.locator("#gen_max input[type=number]").press("Enter")
    page.locator("#gen_mode label", has_text="single prompt").click()
    output = page.locator("#gen_out textarea")
    expect(output).to_be_visible()
    page.locator("#gen_in textarea").fill("Once upon a time, in a small village,")
    page.locator("#gen_btn").click()
    seen, deadline = [], time.monotonic() + 180
    while time.monotonic() < deadline:
        value = output.input_value()
        if value and (not seen or value != seen[-1]):
            seen.append(value)
        if page.locator("#gen_btn").is_enabled() and len(seen) > 1 and \
                page.locator("#gen_out .generating, #gen_out .pending").count() == 0:
            time.sleep(1)
            if output.input_value() == seen[-1]:
                break
        time.sleep(0.05)
    assert seen and seen[-1].startswith("Once upon a time")
    assert len(seen[-1]) > len("Once upon a time, in a small village,") + 5
    # streamed: the page showed the text growing, not just the end result
    grown = [s for s in seen if len(s) > len("Once upon a time, in a small village,")]
    assert len(grown) >= 3, seen
    page.locator("#gen_mode label", has_text="chat").click()
    page.locator("#gen_in textarea").fill("Say hello to me.")
    page.locator("#gen_btn").click()
    expect(page.locator("#gen_chat [data-testid=user]").last).to_have_text("Say hello to me.")
    bot = page.locator("#gen_chat [data-testid=bot]").last
    last, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline:  # the reply streams in, then stops changing
        text = bot.inner_text().strip() if bot.count() else ""
        if text and text != "…" and text == last:
            break
        last = text
        time.sleep(1.5)
    assert last and last != "…", f"no reply streamed into the chat: {last!r}"
    page.screenshot(path=OUTPUT / "demo-generate.png", full_page=True)


def test_feedback_analysis_from_a_csv_with_download(page, tmp_path):
    reviews = ["Works well and fast.", "Gave me a terrible headache.", "Not sure yet.",
               "Life changing medicine.", "Stopped after a week, nausea.", "It is fine."]
    src = tmp_path / "reviews.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review", "stars"])
        w.writerows([i, r, 3] for i, r in enumerate(reviews))
    _tab(page, "Feedback analysis")
    page.locator("#fb_file input[type=file]").set_input_files(str(src))
    expect(page.locator("#fb_column input")).to_have_value("review")
    page.locator("#fb_btn").click()
    expect(page.locator("#fb_summary")).to_contain_text("6 texts classified", timeout=180_000)
    # aria-rowcount counts the header row too
    expect(page.locator("#fb_table [role=grid]")).to_have_attribute("aria-rowcount", "7")
    flagged = page.locator("#fb_flagged [role=grid]")
    expect(flagged).to_have_attribute("aria-rowcount", "2")  # 10% of 6 rounds up to one
    with page.expect_download() as info:
        page.locator("#fb_download a").first.click()
    saved = OUTPUT / "demo-results.csv"
    info.value.save_as(saved)
    rows = list(csv.DictReader(saved.open()))
    assert [r["text"] for r in rows] == reviews
    assert all(r["label"] in ("positive", "negative", "neutral") for r in rows)
    assert sum(r["check"] == "True" for r in rows) == 1
    page.screenshot(path=OUTPUT / "demo-feedback.png", full_page=True)


def test_compare_two_models_side_by_side(page):
    _tab(page, "Compare")
    page.locator("#cmp_text textarea").fill(REVIEW)
    page.locator("#cmp_btn").click()
    # A is the base model (no labels: says so), B the first classification adapter by name
    expect(page.locator("#cmp_out_a textarea")).to_have_value(
        re.compile(r"^smollm2-135m is not a classification adapter: it has no labels"),
        timeout=120_000)
    expect(page.locator("#cmp_out_b textarea")).to_have_value(
        re.compile(r"^reviews-classify: (positive|negative|neutral) \("))
    page.screenshot(path=OUTPUT / "demo-compare.png", full_page=True)


def test_new_adapters_appear_without_reloading(page, gateway):
    _tab(page, "Adapters")
    table = page.locator("#ad_table")
    expect(table).to_contain_text("sentiment")
    expect(table).not_to_contain_text("sentiment-fresh")
    gateway.staging.copy("sentiment", "sentiment-fresh", into=gateway.store)
    expect(table).to_contain_text("sentiment-fresh", timeout=60_000)  # timer, no reload
    _tab(page, "Classify")
    page.locator("#cls_model input").click()
    expect(page.get_by_role("option", name="sentiment-fresh")).to_be_visible()
    page.keyboard.press("Escape")
    _tab(page, "Adapters")
    page.locator("#ad_name textarea, #ad_name input").first.fill("sentiment-fresh")
    page.locator("#ad_unload").click()
    expect(page.locator("#ad_result")).to_contain_text("sentiment-fresh: unloaded")
    expect(table).to_contain_text("unloaded by hand")
    page.screenshot(path=OUTPUT / "demo-adapters.png", full_page=True)


def test_validation_examples_of_the_adapter_are_one_click_away(page, gateway):
    import httpx

    cards = httpx.get(f"{gateway.url}/v1/models",
                      headers={"Authorization": f"Bearer {gateway.key}"}).json()["data"]
    examples = next(c["examples"] for c in cards if c.get("task") == "classification")
    assert examples, "the trainer records validation examples in the manifest"
    box = page.locator("#cls_val_examples")
    expect(box).to_be_visible()
    box.get_by_text(examples[0][:30], exact=False).first.click()
    expect(page.locator("#cls_text textarea")).to_have_value(examples[0])
