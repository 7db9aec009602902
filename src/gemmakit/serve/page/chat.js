// gemmakit's chat page: one conversation, streamed from /v1/chat/completions (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
const log = $("log"), prompt = $("prompt"), send = $("send"), stop = $("stop");
const fields = ["system", "temperature", "top_p", "seed", "max_tokens", "api_key"];
let messages = [];   // the conversation so far, in OpenAI's shape
let model = null;    // the id the server serves (from /v1/models)
let running = null;  // the AbortController of the reply being streamed

for (const f of fields) {  // settings survive a reload
  const saved = localStorage.getItem("gemmakit." + f);
  if (saved !== null) $(f).value = saved;
  $(f).addEventListener("change", () => localStorage.setItem("gemmakit." + f, $(f).value));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("api_key").value) h["Authorization"] = "Bearer " + $("api_key").value;
  return h;
}

function bubble(kind, text) {
  const div = document.createElement("div");
  div.className = "message " + kind;
  div.textContent = text;
  log.appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch (e) { return response.status + " " + response.statusText; }
}

async function loadModel() {
  const response = await fetch("v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorText(response));
  model = (await response.json()).data[0].id;
  $("model").textContent = model;
}

function number(id) {
  const v = parseFloat($(id).value);
  return Number.isFinite(v) ? v : undefined;
}

async function ask(text) {
  if (model === null) await loadModel();
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant streaming", "");
  const system = $("system").value.trim();
  const body = {
    model, stream: true,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    temperature: number("temperature"), top_p: number("top_p"), max_tokens: number("max_tokens"),
    seed: number("seed"),  // an empty field is undefined, left out of the JSON: the server's default
  };
  running = new AbortController();
  send.disabled = true; stop.disabled = false;
  let answer = "", finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {  // one event per blank-line-terminated block
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          for (const choice of chunk.choices) {
            answer += (choice.delta && choice.delta.content) || "";
            finish = choice.finish_reason || finish;
          }
          reply.textContent = answer;
          reply.scrollIntoView({ block: "end" });
        }
      }
    }
    if (finish === "length") bubble("note", "(cut at max tokens)");
  } catch (e) {
    if (e.name === "AbortError") bubble("note", "(stopped)");
    else bubble("error", String(e.message || e));
  } finally {
    reply.classList.remove("streaming");
    reply.dataset.done = "true";  // for scripts (and tests) that wait for the end of a reply
    if (answer) messages.push({ role: "assistant", content: answer });
    else { messages.pop(); if (!reply.textContent) reply.remove(); }  // nothing came: the turn is not kept
    running = null;
    send.disabled = false; stop.disabled = true;
    prompt.focus();
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = prompt.value.trim();
  if (!text || running) return;
  prompt.value = "";
  ask(text);
});
prompt.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
stop.addEventListener("click", () => running && running.abort());
$("reset").addEventListener("click", () => {
  if (running) running.abort();
  messages = [];
  log.replaceChildren();
  prompt.focus();
});
loadModel().catch((e) => bubble("error", String(e.message || e)));
