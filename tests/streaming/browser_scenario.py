"""Real-browser scenario, run by test_browser.py inside a network namespace: the server (tiny preset) and headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright) with a fake microphone playing a speech WAV.

    python browser_scenario.py --address 10.213.0.1 --wav speech.wav --out result.json

Media (ICE) uses ``--address`` (Chromium ignores loopback candidates); the page and signalling stay on 127.0.0.1.
Writes a JSON report: frames the page decoded, what the server heard from the microphone, how the session ended.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))


async def scenario(args) -> dict:
    from playwright.async_api import async_playwright

    import stream_client as C
    from mmgt import pipeline as P
    from mmgt.config import TINY
    from PIL import Image

    models = P.build_models(TINY)
    image = np.asarray(Image.open(ROOT / "engine" / "assets" / "portrait.jpg").convert("RGB"))
    avatar = P.prepare_avatar(models, image)
    report: dict = {"console": []}
    async with C.running_server(models, avatar, media_addresses=(args.address,), max_sessions=1) as (server, url):
        report["warmup_s"] = await asyncio.get_running_loop().run_in_executor(None, server.warmup)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=args.chromium, headless=True, args=[
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={args.wav}", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                "--disable-features=WebRtcHideLocalIpsWithMdns"])
            try:
                page = await browser.new_page()
                page.on("console", lambda m: report["console"].append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: report["console"].append(f"pageerror: {e}"))
                await page.goto(url)
                await page.check("input[name=source][value=mic]")
                t0 = time.monotonic()
                await page.click("#start")
                # 1. the page decodes the avatar video
                await page.wait_for_function(
                    "() => document.getElementById('avatar').getVideoPlaybackQuality().totalVideoFrames >= 100",
                    timeout=args.timeout * 1000)
                report["seconds_to_100_frames"] = time.monotonic() - t0
                await asyncio.sleep(1.5)  # let the page poll the stats once more
                report["page"] = await page.evaluate("""() => ({
                    decoded: document.getElementById('avatar').getVideoPlaybackQuality().totalVideoFrames,
                    dropped: document.getElementById('avatar').getVideoPlaybackQuality().droppedVideoFrames,
                    callbackFrames: window.mmgt.frames, firstFrameMs: window.mmgt.firstFrameMs,
                    session: window.mmgt.session, state: document.getElementById('s-state').textContent,
                    audioTracks: document.getElementById('avatar').srcObject.getAudioTracks().length,
                    error: document.getElementById('error').textContent })""")
                # 2. what the server heard from the fake microphone
                sid = report["page"]["session"]
                report["server_stats"] = server.sessions[sid].stats()
                # 3. stop on the page frees the session
                await page.click("#stop")
                deadline = time.monotonic() + 20
                while sid not in server.closed_sessions and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                report["closed"] = server.closed_sessions.get(sid, {}).get("close_reason")
                report["sessions_after_stop"] = len(server.sessions)
            finally:
                await browser.close()
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True, help="this namespace's media address (ICE host candidate)")
    ap.add_argument("--wav", required=True, help="speech WAV for Chromium's fake microphone")
    ap.add_argument("--out", required=True, type=Path, help="JSON report")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for 100 decoded frames")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Trying to estimate tuning")
    import torch

    torch.set_num_threads(1)
    try:
        report = asyncio.run(scenario(args))
    except Exception as e:  # the report says what failed; the test prints it
        report = {"error": f"{type(e).__name__}: {e}"}
        args.out.write_text(json.dumps(report, indent=1, default=str))
        raise
    args.out.write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
