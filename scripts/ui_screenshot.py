#!/usr/bin/env python
"""Screenshot of the browser UI for README: drives a running tools/serve.py like a user.

    python scripts/ui_screenshot.py --url http://127.0.0.1:8000 --query obj03_1 --out docs/serve.png

Picks the dataset query whose name contains --query in the "Queries" tab, keeps its box, runs the
chosen stage and saves a full-page screenshot. Needs Playwright and Debian's chromium (as the
end-to-end test, tests/serving/test_browser.py).
"""

import argparse

from playwright.sync_api import sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--query", required=True, help="part of the query's image id")
    p.add_argument("--rerank", default="ca_sr", choices=["none", "ca_sr", "cs_sr"])
    p.add_argument("--no-qe", action="store_true")
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--out", default="docs/serve.png")
    args = p.parse_args()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=args.chromium, headless=True, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(args.url)
        page.click("#tab-query")
        page.fill("#filter", args.query)
        page.wait_for_function("document.querySelectorAll('.thumb').length === 1")
        page.click(".thumb")
        page.wait_for_selector("#query-canvas[data-ready='1']")
        page.check(f"input[name=rerank][value={args.rerank}]")
        page.set_checked("#qe", not args.no_qe)
        page.fill("#top-k", str(args.top_k))
        page.click("#search")
        page.wait_for_selector(".hit")
        page.wait_for_function(
            "[...document.querySelectorAll('.hit img')].every((i) => i.complete)"
        )
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
