// The chat page: streams /v1/chat/completions and shows each answer's speed and acceptance length.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const prompt = $("prompt");
const temperature = $("temperature");
const history = [];  // {role, content} turns sent with every request
let modelName = null;
let running = null;  // the AbortController of the answer being streamed

temperature.addEventListener("input", () => {
  $("temperature-value").textContent = Number(temperature.value).toFixed(2);
});
$("api-key").value = localStorage.getItem("eaglespec-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("eaglespec-api-key", $("api-key").value);
  loadModel();
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = `(${e.message})`;
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  div.appendChild(content);
  conversation.appendChild(div);
  conversation.scrollTop = conversation.scrollHeight;
  return div;
}

function showStats(div, text) {
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = text;
  div.appendChild(stats);
}

// Server-sent events: events end with a blank line; their data lines start with "data:".
function* sseData(buffer) {
  let end;
  while ((end = buffer.text.indexOf("\n\n")) >= 0) {
    const event = buffer.text.slice(0, end);
    buffer.text = buffer.text.slice(end + 2);
    const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
    if (data.length) yield data.join("\n");
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const content = div.querySelector(".content");
  const controller = new AbortController();
  running = controller;
  setBusy(true);
  const started = performance.now();
  let firstAt = null, answer = "", done = null, usage = null;
  try {
    const body = {
      messages: history, stream: true, stream_options: { include_usage: true },
      temperature: Number(temperature.value), max_tokens: Number($("max-tokens").value) || undefined,
    };
    if (modelName) body.model = modelName;
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `${r.status} ${r.statusText}`);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    const buffer = { text: "" };
    for (;;) {
      const { value, done: eof } = await reader.read();
      if (eof) break;
      buffer.text += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      for (const data of sseData(buffer)) {
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta && choice.delta.content) {
          if (firstAt === null) firstAt = performance.now();
          answer += choice.delta.content;
          content.textContent = answer;
          conversation.scrollTop = conversation.scrollHeight;
        }
        if (choice.finish_reason) done = { reason: choice.finish_reason, spec: chunk.speculative };
      }
    }
    history.push({ role: "assistant", content: answer });
    const s = done && done.spec;
    const tokens = usage ? usage.completion_tokens : null;
    const parts = [];
    if (tokens !== null) parts.push(`${tokens} tokens`);
    if (s) parts.push(`${s.tokens_per_s.toFixed(1)} tokens/s`, `acceptance length ${s.mean_accept_len.toFixed(2)}`,
                      `${s.target_forwards} target forwards`);
    if (firstAt !== null) parts.push(`first text after ${((firstAt - started) / 1000).toFixed(2)} s`);
    if (done && done.reason === "length") parts.push("cut at max tokens");
    showStats(div, parts.join(" · "));
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: answer });
      showStats(div, "stopped");
    } else {
      history.pop();  // the turn failed: do not resend it
      div.classList.add("error");
      content.textContent = answer ? `${answer}\n\n${e.message}` : e.message;
    }
  } finally {
    div.classList.remove("streaming");
    running = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  $("clear").disabled = busy;
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = prompt.value.trim();
  if (!text || running) return;
  prompt.value = "";
  send(text);
});
prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", () => {
  history.length = 0;
  conversation.replaceChildren();
  prompt.focus();
});

loadModel();
prompt.focus();
