// Drives the real @langchain/langgraph-sdk Client against a server and prints
// ONE JSON object on stdout describing what it observed.
//
//   node sdk_check.mjs --url http://127.0.0.1:PORT [--api-key KEY] --scenario stream|join|threads
//        [--text "..."] [--delay-ms N] [--last-event-id ID]
import { parseArgs } from "node:util";
import { setTimeout as sleep } from "node:timers/promises";
import { Client } from "@langchain/langgraph-sdk";

const STREAM_MODE = ["values", "messages-tuple"];

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    "api-key": { type: "string" },
    scenario: { type: "string" },
    text: { type: "string", default: "What is 12 * 8?" },
    "delay-ms": { type: "string", default: "0" },
    "last-event-id": { type: "string" },
  },
});
if (!args.url || !args.scenario) {
  process.stderr.write("usage: sdk_check.mjs --url URL [--api-key KEY] --scenario stream|join|threads\n");
  process.exit(2);
}

// Every HTTP exchange the SDK makes, so a test can assert on status codes and
// headers the SDK itself hides (e.g. the status of DELETE, Content-Location).
const http = [];
async function recordingFetch(input, init) {
  const response = await fetch(input, init);
  const url = new URL(typeof input === "string" ? input : input.url);
  const entry = {
    method: init?.method ?? "GET",
    path: url.pathname + url.search,
    status: response.status,
    content_type: response.headers.get("content-type"),
    content_location: response.headers.get("content-location"),
    location: response.headers.get("location"),
  };
  // Bodies of SSE responses are left to the SDK; reading a clone would stall it.
  if (!entry.content_type?.includes("text/event-stream") && (entry.method === "DELETE" || response.status >= 400)) {
    entry.body = await response.clone().text();
  }
  http.push(entry);
  return response;
}

const client = new Client({
  apiUrl: args.url,
  // null (not undefined) stops the SDK from picking up LANGSMITH_API_KEY etc.
  apiKey: args["api-key"] ?? null,
  callerOptions: { fetch: recordingFetch },
});

const input = () => ({ messages: [{ role: "user", content: args.text }] });

function textOf(content) {
  if (typeof content === "string") return content;
  if (Array.isArray(content)) return content.map((part) => (typeof part === "string" ? part : part?.text ?? "")).join("");
  return content == null ? null : JSON.stringify(content);
}

async function collect(stream) {
  const seen = {
    events: [],
    sse_ids: [],
    first_payloads: {},
    metadata: null,
    messages: [],
    tokens: [],
    message_ids: [],
    final_values: null,
    final_answer: null,
    errors: [],
  };
  for await (const { id, event, data } of stream) {
    seen.events.push(event);
    seen.sse_ids.push(id ?? null);
    if (!(event in seen.first_payloads)) seen.first_payloads[event] = data;
    if (event === "metadata") seen.metadata = data;
    else if (event === "error") seen.errors.push(data);
    else if (event === "values") seen.final_values = data;
    else if (event.startsWith("messages")) {
      const [chunk, meta] = Array.isArray(data) ? data : [data, null];
      const token = textOf(chunk?.content);
      seen.messages.push({
        event,
        id: chunk?.id ?? null,
        type: chunk?.type ?? null,
        content: token,
        tool_calls: chunk?.tool_calls ?? [],
        tool_call_chunks: chunk?.tool_call_chunks ?? [],
        node: meta?.langgraph_node ?? null,
      });
      seen.tokens.push(token);
      if (chunk?.id && !seen.message_ids.includes(chunk.id)) seen.message_ids.push(chunk.id);
    }
  }
  const messages = seen.final_values?.messages;
  if (Array.isArray(messages) && messages.length) seen.final_answer = textOf(messages.at(-1).content);
  seen.run_id = seen.metadata?.run_id ?? null;
  return seen;
}

async function streamScenario() {
  const thread = await client.threads.create();
  let runCreated = null;
  const seen = await collect(
    client.runs.stream(thread.thread_id, "agent", {
      input: input(),
      streamMode: STREAM_MODE,
      // Called only when the Content-Location header was present and readable.
      onRunCreated: (meta) => (runCreated = meta),
    }),
  );
  return { thread_id: thread.thread_id, run_created: runCreated, ...seen };
}

async function joinScenario() {
  const thread = await client.threads.create();
  let runCreated = null;
  const run = await client.runs.create(thread.thread_id, "agent", {
    input: input(),
    streamMode: STREAM_MODE,
    streamResumable: true,
    onRunCreated: (meta) => (runCreated = meta),
  });
  const delayMs = Number(args["delay-ms"]);
  if (delayMs > 0) await sleep(delayMs);
  const seen = await collect(
    client.runs.joinStream(thread.thread_id, run.run_id, {
      streamMode: STREAM_MODE,
      lastEventId: args["last-event-id"],
    }),
  );
  const final = await client.runs.get(thread.thread_id, run.run_id);
  return {
    thread_id: thread.thread_id,
    run_created: runCreated,
    created_run: { run_id: run.run_id, status: run.status, keys: Object.keys(run).sort() },
    final_status: final.status,
    ...seen,
  };
}

async function threadsScenario() {
  const metadata = { sdk_check: `t-${Date.now()}-${Math.random().toString(36).slice(2, 8)}` };
  const created = await client.threads.create({ metadata });
  const fetched = await client.threads.get(created.thread_id);
  const found = await client.threads.search({ metadata, limit: 10 });
  const deleted = await client.threads.delete(created.thread_id);
  let afterDelete;
  try {
    await client.threads.get(created.thread_id);
    afterDelete = "found";
  } catch (error) {
    afterDelete = error?.status ?? String(error);
  }
  const del = http.find((h) => h.method === "DELETE");
  return {
    thread_id: created.thread_id,
    created,
    fetched,
    search: { is_array: Array.isArray(found), ids: found.map((t) => t.thread_id), first: found[0] ?? null },
    delete: { status: del?.status ?? null, body: del?.body ?? null, sdk_result: deleted ?? null },
    get_after_delete: afterDelete,
  };
}

const scenarios = { stream: streamScenario, join: joinScenario, threads: threadsScenario };

try {
  const run = scenarios[args.scenario];
  if (!run) throw new Error(`unknown scenario ${JSON.stringify(args.scenario)}`);
  const result = await run();
  process.stdout.write(JSON.stringify({ scenario: args.scenario, ...result, http }) + "\n");
} catch (error) {
  process.stderr.write(`sdk_check ${args.scenario} failed: ${error?.stack ?? error}\n`);
  if (error?.text) process.stderr.write(`response body: ${error.text}\n`);
  process.stderr.write(`http: ${JSON.stringify(http)}\n`);
  process.exit(1);
}
