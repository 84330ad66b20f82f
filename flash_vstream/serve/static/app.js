// The page at `/`: the camera (getUserMedia) or a local file plays in a <video>; a frame is taken at the
// session's fps, JPEG-encoded and sent over the session's WebSocket (input_image.append); questions go
// out as response.create and their answers stream in (response.output_text.delta, response.done) with
// the stream time they were answered at; the memory timeline is redrawn from GET /v1/sessions/{id}/memory.
"use strict";

const $ = (id) => document.getElementById(id);
const FRAME_WIDTH = 320; // px: frames are shrunk before sending (CLIP sees 224 px anyway)
const state = { session: null, ws: null, timer: null, poll: null, t0: 0, lastTs: -1, asked: 0, answers: {} };

$("key").value = localStorage.getItem("flash_vstream_key") || new URLSearchParams(location.search).get("api_key") || "";

function headers() {
  const key = $("key").value.trim();
  localStorage.setItem("flash_vstream_key", key);
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function report(message) { $("log").textContent = message || ""; }

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
  return data;
}

async function start(setupVideo) {
  await stop();
  report("");
  try {
    const fps = Math.max(0.1, Math.min(30, parseFloat($("fps").value) || 1));
    await setupVideo();
    state.session = await api("POST", "/v1/sessions", { source: { type: "push" }, fps });
    const key = $("key").value.trim();
    const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/sessions/${state.session.id}/ws`
      + (key ? `?api_key=${encodeURIComponent(key)}` : "");
    state.ws = new WebSocket(url);
    state.ws.onmessage = (e) => onEvent(JSON.parse(e.data));
    state.ws.onclose = () => { $("ask-button").disabled = true; };
    await new Promise((resolve, reject) => { state.ws.onopen = resolve; state.ws.onerror = () => reject(new Error("WebSocket refused")); });
    state.t0 = performance.now();
    state.lastTs = -1;
    state.timer = setInterval(sendFrame, 1000 / fps);
    state.poll = setInterval(refresh, 1000);
    $("ask-button").disabled = false;
    $("stop").disabled = false;
  } catch (e) {
    report(e.message);
  }
}

async function stop() {
  clearInterval(state.timer);
  clearInterval(state.poll);
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify({ type: "session.close" }));
  state.ws = null;
  state.session = null;
  const video = $("video");
  if (video.srcObject) { video.srcObject.getTracks().forEach((t) => t.stop()); video.srcObject = null; }
  $("stop").disabled = true;
  $("ask-button").disabled = true;
}

async function useCamera() {
  const video = $("video");
  video.removeAttribute("src");
  video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  await video.play();
}

function useFile(file) {
  return async () => {
    const video = $("video");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
    video.loop = false;
    await video.play();
  };
}

function sendFrame() {
  const video = $("video");
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN || video.readyState < 2 || !video.videoWidth) return;
  // stream time: the file's own clock, or seconds since the camera started
  const ts = video.srcObject ? (performance.now() - state.t0) / 1000 : video.currentTime;
  if (!(ts > state.lastTs)) return; // paused or ended file: no new frame
  state.lastTs = ts;
  const canvas = document.createElement("canvas");
  canvas.width = FRAME_WIDTH;
  canvas.height = Math.round(FRAME_WIDTH * video.videoHeight / video.videoWidth);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  state.ws.send(JSON.stringify({ type: "input_image.append", image: canvas.toDataURL("image/jpeg", 0.8), timestamp: ts }));
}

function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || !state.ws) return;
  const id = `q${++state.asked}`;
  const li = document.createElement("li");
  li.id = `answer-${id}`;
  li.innerHTML = '<div class="q"></div><div class="a"></div><div class="meta">answering...</div>';
  li.querySelector(".q").textContent = question;
  $("answers").prepend(li);
  state.answers[id] = li;
  state.ws.send(JSON.stringify({ type: "response.create", question, response_id: id, max_tokens: 64 }));
  $("question").value = "";
}

function onEvent(e) {
  const li = e.response_id && state.answers[e.response_id];
  if (e.type === "session.created") {
    showStatus(e.session);
  } else if (e.type === "response.output_text.delta" && li) {
    li.querySelector(".a").textContent += e.delta;
  } else if (e.type === "response.done" && li) {
    li.querySelector(".a").textContent = e.text;
    li.querySelector(".meta").textContent = `at stream time ${e.stream_time.toFixed(1)} s, ${e.frames_seen} frames seen, `
      + `${e.memory_tokens} memory tokens; first token ${fmt(e.ttft_s)}, answer ${fmt(e.latency_s)}`;
    li.classList.add("done");
  } else if (e.type === "error") {
    if (li) {
      li.classList.add("error", "done");
      li.querySelector(".a").textContent = e.message;
      li.querySelector(".meta").textContent = e.code;
    } else {
      report(`${e.code}: ${e.message}`);
    }
  }
}

function fmt(seconds) { return seconds == null ? "-" : `${(seconds * 1000).toFixed(0)} ms`; }

function showStatus(s) {
  $("status").textContent = `session ${s.id}: ${s.state}, ${s.frames_seen} frames seen, stream time `
    + `${s.stream_time.toFixed(1)} s, ${s.memory_tokens} memory tokens, ${s.dropped_frames} dropped`
    + (s.error ? `; ${s.error}` : "");
  $("status").dataset.framesSeen = s.frames_seen;
}

async function refresh() {
  if (!state.session) return;
  try {
    const id = state.session.id;
    const [s, memory] = await Promise.all([api("GET", `/v1/sessions/${id}`), api("GET", `/v1/sessions/${id}/memory`)]);
    showStatus(s);
    drawTimeline(memory);
  } catch (e) {
    report(e.message);
  }
}

function drawTimeline(m) {
  const canvas = $("timeline");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const left = 80, right = width - 16, end = Math.max(m.stream_time, 1);
  const x = (t) => left + (right - left) * t / end;
  const rows = [["temporal", 30, "#1f6feb"], ["retrieved", 70, "#d97706"], ["spatial", 100, "#16a34a"]];
  g.font = "12px system-ui, sans-serif";
  g.fillStyle = "#66707c";
  for (const [name, y] of rows) g.fillText(name, 8, y + 4);
  g.strokeStyle = "#d7dce2";
  g.beginPath(); g.moveTo(left, 122); g.lineTo(right, 122); g.stroke();
  for (let k = 0; k <= 4; k++) {
    const t = end * k / 4;
    g.fillText(`${t.toFixed(end < 10 ? 1 : 0)} s`, x(t) - 8, 138);
  }
  const maxWeight = Math.max(1, ...m.temporal_weights);
  m.timestamps.temporal.forEach((t, i) => {
    const span = m.temporal_spans[i] || [t, t];
    g.fillStyle = "rgba(31,111,235,.25)";
    g.fillRect(x(span[0]), 22, Math.max(2, x(span[1]) - x(span[0])), 16);
    g.fillStyle = "#1f6feb";
    const r = 2 + 4 * Math.sqrt((m.temporal_weights[i] || 1) / maxWeight);
    g.beginPath(); g.arc(x(t), 30, r, 0, 2 * Math.PI); g.fill();
  });
  for (const [name, y, color] of rows.slice(1)) {
    g.fillStyle = color;
    for (const t of m.timestamps[name] || []) g.fillRect(x(t) - 2, y - 7, 4, 14);
  }
}

$("start-camera").onclick = () => start(useCamera);
$("file").onchange = (e) => { if (e.target.files[0]) start(useFile(e.target.files[0])); };
$("stop").onclick = stop;
$("ask").onsubmit = ask;
