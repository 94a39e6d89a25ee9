// MMGT live presenter page: send the microphone (or a file played through WebAudio), receive the avatar video and
// the rendered audio in one MediaStream, and show live stats. Avatars: GET /avatars lists them, POST /avatars (an
// image file) adds one. Signalling: POST /offer {sdp, type, avatar} -> {sdp, type, session}; stats: GET
// /stats/<session>; leaving: POST /close/<session>; text to speak: POST /say/<session> {text, interrupt}, stopping
// it: POST /interrupt/<session>. No trickle ICE: the offer carries all candidates (the server is aiortc, which
// answers with all of its own).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  pc: null, session: null, stream: null, audioCtx: null, startedAt: 0, firstFrameMs: null,
  frames: 0, timer: null, lastDecoded: 0, lastDecodedAt: 0, fps: 0, micStream: null,
  audioLevel: null, audioEnergy: 0, said: [],
};
window.mmgt = state;  // for tests and curious users: window.mmgt.frames, window.mmgt.session

function setState(text) { $("s-state").textContent = text; }
function showError(text) { $("error").textContent = text || ""; }

async function waitIceGathering(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);  // send what we have; host candidates come first
  });
}

// The chosen source as an audio track: the microphone, or a file decoded and played into a MediaStream.
async function sourceTrack(kind) {
  if (kind === "mic") {
    state.micStream = await navigator.mediaDevices.getUserMedia({ audio: { echoCancellation: true }, video: false });
    return state.micStream.getAudioTracks()[0];
  }
  if (kind === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("choose an audio file first");
    state.audioCtx = new AudioContext();
    const buffer = await state.audioCtx.decodeAudioData(await file.arrayBuffer());
    const src = state.audioCtx.createBufferSource();
    src.buffer = buffer;
    const dest = state.audioCtx.createMediaStreamDestination();
    src.connect(dest);  // not to the speakers: the avatar's audio (in sync with its mouth) comes back instead
    state.fileSource = src;
    return dest.stream.getAudioTracks()[0];
  }
  return null;  // "none": the avatar idles
}

async function start() {
  showError("");
  $("start").disabled = true;
  $("stop").disabled = false;
  $("avatar-pick").disabled = true;
  const kind = document.querySelector("input[name=source]:checked").value;
  try {
    const pc = new RTCPeerConnection({ iceServers: [] });
    state.pc = pc;
    state.frames = 0; state.firstFrameMs = null; state.startedAt = performance.now();
    const track = await sourceTrack(kind);
    if (track) pc.addTransceiver(track, { direction: "sendrecv" });
    else pc.addTransceiver("audio", { direction: "recvonly" });
    pc.addTransceiver("video", { direction: "recvonly" });
    const video = $("avatar");
    pc.ontrack = (ev) => {
      if (video.srcObject !== ev.streams[0]) { video.srcObject = ev.streams[0]; video.play().catch(() => {}); }
    };
    pc.onconnectionstatechange = () => {
      setState(pc.connectionState);
      if (pc.connectionState === "failed") { showError("connection failed (ICE): is the UDP port range reachable?"); stop(); }
    };
    countFrames(video);
    setState("connecting");
    await pc.setLocalDescription(await pc.createOffer());
    await waitIceGathering(pc, 3000);
    const resp = await fetch("/offer", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type,
                             avatar: $("avatar-id").value || undefined }),
    });
    const answer = await resp.json();
    if (!resp.ok) throw new Error(`server said ${resp.status}: ${answer.error}`);
    state.session = answer.session;
    $("interrupt").disabled = false;
    await pc.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
    if (state.fileSource) state.fileSource.start();
    state.timer = setInterval(pollStats, 1000);
  } catch (err) {
    showError(String(err.message || err));
    stop();
  }
}

// Count decoded frames (requestVideoFrameCallback where available) for first-frame latency and received fps.
function countFrames(video) {
  if (!("requestVideoFrameCallback" in HTMLVideoElement.prototype)) return;
  const onFrame = () => {
    state.frames += 1;
    if (state.firstFrameMs === null) state.firstFrameMs = performance.now() - state.startedAt;
    if (state.pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function fmt(v, unit, digits = 0) { return v === null || v === undefined ? "-" : `${Number(v).toFixed(digits)} ${unit}`; }

async function pollStats() {
  const video = $("avatar");
  const q = video.getVideoPlaybackQuality ? video.getVideoPlaybackQuality() : null;
  const decoded = q ? q.totalVideoFrames : state.frames;
  const now = performance.now();
  if (state.lastDecodedAt) state.fps = (decoded - state.lastDecoded) * 1000 / (now - state.lastDecodedAt);
  state.lastDecoded = decoded; state.lastDecodedAt = now;
  $("s-decoded").textContent = `${decoded}`;
  await readAudioLevel();
  if (!state.session) return;
  try {
    const resp = await fetch(`/stats/${state.session}`);
    const s = await resp.json();
    if (!resp.ok) return;
    setState(`${s.state}${state.pc ? " / " + state.pc.connectionState : ""}`);
    $("s-first").textContent = `${fmt(s.first_frame_latency_ms, "ms")} server, ${fmt(state.firstFrameMs, "ms")} page`;
    $("s-fps").textContent = `${state.fps.toFixed(1)} / ${fmt(s.fps, "", 1)}`;
    $("s-av").textContent = fmt(s.av_offset_ms, "ms", 1);
    $("s-dropped").textContent = `${s.frames_dropped} / ${s.frames_repeated}`;
    $("s-latency").textContent = fmt(s.output_latency_ms, "ms");
    const b = s.latency_budget_ms && s.latency_budget_ms.p50;  // audio in -> frame out, per stage
    $("s-budget").textContent = b ? `audio ${b.audio_wait.toFixed(0)} + pose ${b.stage1.toFixed(0)} + render `
      + `${b.stage2.toFixed(0)} + decode ${b.decode.toFixed(0)} + playout ${b.playout.toFixed(0)} ms `
      + `(measured ${b.total.toFixed(0)} ms)` : "-";
    $("s-input").textContent = `${s.input.received_seconds.toFixed(1)} s (${s.input.source}), peak ${s.input.peak.toFixed(2)}`;
    const sp = s.speech;
    $("s-speech").textContent = sp.tts ? `${sp.queued} / ${sp.playing || "-"} / ${sp.utterances.done} / ${sp.utterances.interrupted}`
      : `unavailable: ${sp.tts_error}`;
    if (s.error) showError(s.error);
  } catch (err) { /* the server went away: the connection state shows it */ }
}

// The level of the avatar's audio as this page receives it (WebRTC inbound-rtp stats: 0 silent, 1 full scale).
async function readAudioLevel() {
  if (!state.pc) return;
  try {
    (await state.pc.getStats()).forEach((r) => {
      if (r.type === "inbound-rtp" && r.kind === "audio") {
        state.audioLevel = r.audioLevel ?? null;
        state.audioEnergy = r.totalAudioEnergy ?? 0;
      }
    });
  } catch (err) { return; }
  $("s-level").textContent = state.audioLevel === null ? "-" : state.audioLevel.toFixed(3);
}

// Speak: the text goes to the session (one is started with the chosen source first when none is running).
async function speak() {
  const text = $("say-text").value;
  showError("");
  try {
    if (!state.pc) await start();
    if (!state.session) return;  // start() said why
    const resp = await fetch(`/say/${state.session}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text, interrupt: $("say-interrupt").checked }),
    });
    const data = await resp.json();
    if (!resp.ok) throw new Error(`server said ${resp.status}: ${data.error}`);
    state.said.push(data.utterance);
    $("say-status").textContent = `accepted ${data.utterance} (${data.queued} waiting to be spoken)`;
  } catch (err) {
    showError(`speak refused: ${err.message || err}`);
  }
}

async function interrupt() {
  if (!state.session) return;
  try {
    const resp = await fetch(`/interrupt/${state.session}`, { method: "POST" });
    const data = await resp.json();
    if (!resp.ok) throw new Error(`server said ${resp.status}: ${data.error}`);
    $("say-status").textContent = data.interrupted.length ? `interrupted ${data.interrupted.join(", ")}` : "nothing to interrupt";
  } catch (err) {
    showError(`interrupt failed: ${err.message || err}`);
  }
}

function stop() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  if (state.session) navigator.sendBeacon(`/close/${state.session}`);
  if (state.pc) state.pc.close();
  if (state.micStream) state.micStream.getTracks().forEach((t) => t.stop());
  if (state.audioCtx) state.audioCtx.close();
  Object.assign(state, { pc: null, session: null, micStream: null, audioCtx: null, fileSource: null });
  $("start").disabled = false;
  $("stop").disabled = true;
  $("interrupt").disabled = true;
  $("avatar-pick").disabled = false;
  setState("stopped");
}

// Avatars: the server's list in the picker; an uploaded image becomes a new avatar and is picked.
async function loadAvatars(pick) {
  const resp = await fetch("/avatars");
  const data = await resp.json();
  const select = $("avatar-id");
  select.innerHTML = "";
  for (const a of data.avatars) {
    const opt = document.createElement("option");
    opt.value = a.id;
    opt.textContent = `${a.id} (${a.source}, ${a.width}x${a.height})`;
    select.appendChild(opt);
  }
  select.value = pick || data.default;
}

async function uploadAvatar() {
  const file = $("avatar-file").files[0];
  if (!file) return;
  $("avatar-status").textContent = "uploading ...";
  const form = new FormData();
  form.append("image", file, file.name);
  try {
    const resp = await fetch("/avatars", { method: "POST", body: form });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error);
    await loadAvatars(data.avatar);
    $("avatar-status").textContent = `added ${data.avatar}`;
  } catch (err) {
    $("avatar-status").textContent = "";
    showError(`upload refused: ${err.message || err}`);
  }
}

$("avatar-file").addEventListener("change", uploadAvatar);
loadAvatars().catch(() => {});
$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("speak").addEventListener("click", speak);
$("interrupt").addEventListener("click", interrupt);
window.addEventListener("pagehide", () => { if (state.session) navigator.sendBeacon(`/close/${state.session}`); });
$("note").textContent = "";
fetch("/health").then((r) => r.json()).then((h) => {
  if (!h.trained) $("note").textContent = `preset "${h.preset}": untrained random weights, the video is not a real avatar.`;
}).catch(() => {});
