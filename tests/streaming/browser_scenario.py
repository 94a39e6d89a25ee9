"""Real-browser scenario, run by test_browser.py inside a network namespace: the server (tiny preset) and headless
Chromium (Debian's /usr/bin/chromium, driven by Playwright) with a fake microphone playing a speech WAV.

    python browser_scenario.py --address 10.213.0.1 --wav speech.wav --out result.json [--say TEXT --screenshot F]

Media (ICE) uses ``--address`` (Chromium ignores loopback candidates); the page and signalling stay on 127.0.0.1.
Writes a JSON report: frames the page decoded, what the server heard from the microphone, how the session ended;
with ``--say``, then the text typed on the page and spoken with Speak (no microphone): the page's received audio
level and energy while the server plays it, the frames decoded meanwhile, and a screenshot.
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
                if args.say:
                    report["speak"] = await speak(page, server, args)
            finally:
                await browser.close()
    return report


RECEIVED_AUDIO = """async () => {
    let out = {level: null, energy: 0, seconds: 0};
    const pc = window.mmgt.pc;
    if (!pc) return out;
    (await pc.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp" && r.kind === "audio")
            out = {level: r.audioLevel ?? null, energy: r.totalAudioEnergy ?? 0, seconds: r.totalSamplesDuration ?? 0};
    });
    out.decoded = document.getElementById('avatar').getVideoPlaybackQuality().totalVideoFrames;
    return out;
}"""


async def speak(page, server, args) -> dict:
    """No microphone: type ``args.say``, press Speak (it starts a session), follow the page's received audio while
    the server plays the utterance; a screenshot mid-speech."""
    out: dict = {}
    await page.check("input[name=source][value=none]")
    await page.fill("#say-text", args.say)
    t0 = time.monotonic()
    await page.click("#speak")
    await page.wait_for_function("() => window.mmgt.said.length === 1", timeout=args.timeout * 1000)
    out["say_answered_s"] = time.monotonic() - t0
    sid, uid = await page.evaluate("() => [window.mmgt.session, window.mmgt.said[0]]")
    session = server.sessions[sid]
    samples = []  # (seconds since Speak, utterance heard now, page's audio stats)
    shot, heard = False, None
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        u = session.speech.utterance(uid)
        playing = session.speech_stats()["playing"]
        samples.append((time.monotonic() - t0, playing, await page.evaluate(RECEIVED_AUDIO)))
        if playing == uid and heard is None and samples[-1][2]["level"] is not None:
            heard = time.monotonic()
        if heard is not None and time.monotonic() - heard > 1.5 and not shot:  # mid-speech, the page's stats
            await page.screenshot(path=args.screenshot, full_page=True)  # polled (every second) meanwhile
            shot = True
        if u["state"] == "done" and session.played_sample() >= u["end_sample"] + 16000:  # played, + 1 s
            break
        await asyncio.sleep(0.1)
    out["utterance"] = session.speech.utterance(uid)
    out["speech_stats"] = session.speech_stats()
    try:  # the page's stats table shows it done (it polls /stats every second)
        await page.wait_for_function("() => document.getElementById('s-speech').textContent.startsWith('0 / - / 1')",
                                     timeout=5000)
    finally:
        out["page_speech_row"] = await page.evaluate("() => document.getElementById('s-speech').textContent")
    out["screenshot"] = str(args.screenshot) if shot else None
    during = [a for _, p, a in samples if p == uid and a["level"] is not None]  # heard, as the page reports it
    out["levels_while_playing"] = [a["level"] for a in during]
    out["level_after"] = samples[-1][2]["level"]  # a second after it was played
    out["energy_while_playing"] = (during[-1]["energy"] - during[0]["energy"]) if len(during) > 1 else 0.0
    out["seconds_while_playing"] = (during[-1]["seconds"] - during[0]["seconds"]) if len(during) > 1 else 0.0
    out["decoded_while_playing"] = (during[-1]["decoded"] - during[0]["decoded"]) if len(during) > 1 else 0
    out["error"] = await page.evaluate("() => document.getElementById('error').textContent")
    await page.click("#stop")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", required=True, help="this namespace's media address (ICE host candidate)")
    ap.add_argument("--wav", required=True, help="speech WAV for Chromium's fake microphone")
    ap.add_argument("--out", required=True, type=Path, help="JSON report")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for 100 decoded frames")
    ap.add_argument("--say", help="then type this text on the page, press Speak (no microphone) and follow it")
    ap.add_argument("--screenshot", type=Path, default=Path("speak.png"), help="the page mid-speech (PNG)")
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
