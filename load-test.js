// Load test: many users, each holding a multi-turn conversation with the agent.
//
//   BASE_URL=http://127.0.0.1:8000 API_KEY=<key> k6 run load-test.js
//   docker compose --profile load run --rm k6          (same script, in a container)
//
// Environment (all optional except API_KEY):
//   BASE_URL      server root                      (default http://127.0.0.1:8000)
//   API_KEY       sent as X-API-Key                (required)
//   VUS           concurrent conversations         (default 10)
//   DURATION      how long to run                  (default 1m)
//   PAUSE_S       think time between turns, 0 ok   (default 1)
//   P95_MS        SLO: p95 of each turn kind, ms   (default 5000)
//   P95_PLAIN_MS, P95_TOOL_MS, P95_STREAM_MS  per-kind overrides of P95_MS
//   SUMMARY_PATH  where the JSON summary goes      (default load-results/summary.json)
//                 k6 does not create its directory: `mkdir -p load-results` first.
//
// Each iteration is one new conversation (thread k6-<vu>-<iter>-<random>) of four turns:
//   1. "my name is <Name>"          plain answer                  -> turn_plain
//   2. "What is 12 * 8?"             tool call, answer has 96      -> turn_tool
//   3. "What is 7 * 6?" via /agent/stream_events, streamed tokens
//      concatenated must contain 42                                -> turn_stream
//   4. "what is my name"             must name <Name> from turn 1  -> turn_plain,
//      memory_failures counts the misses (the thread's memory, possibly on another worker).
//
// k6's HTTP client does not stream: it returns a response only once the body is complete.
// Time to first *token* cannot be observed from here. What is recorded instead is
// stream_time_to_first_byte = res.timings.waiting, the time until the server answered
// the stream request with its first byte (it opened the SSE stream: auth, admission and
// any queueing done) - a lower bound on time to first token, not an estimate of it.
// Real time to first token is measured by a streaming Python client in the tests.

import http from 'k6/http';
import exec from 'k6/execution';
import { check, sleep } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const BASE_URL = (__ENV.BASE_URL || 'http://127.0.0.1:8000').replace(/\/+$/, '');
const API_KEY = __ENV.API_KEY || '';
const VUS = parseInt(__ENV.VUS || '10', 10);
const DURATION = __ENV.DURATION || '1m';
const PAUSE_S = parseFloat(__ENV.PAUSE_S === undefined || __ENV.PAUSE_S === '' ? '1' : __ENV.PAUSE_S);
const P95_MS = parseFloat(__ENV.P95_MS || '5000');
const P95_PLAIN_MS = parseFloat(__ENV.P95_PLAIN_MS || String(P95_MS));
const P95_TOOL_MS = parseFloat(__ENV.P95_TOOL_MS || String(P95_MS));
const P95_STREAM_MS = parseFloat(__ENV.P95_STREAM_MS || String(P95_MS));
const SUMMARY_PATH = __ENV.SUMMARY_PATH || 'load-results/summary.json';

const NAMES = ['Ada', 'Grace', 'Alan', 'Barbara', 'Edsger', 'Margaret', 'Donald', 'Frances'];

const turnPlain = new Trend('turn_plain', true);
const turnTool = new Trend('turn_tool', true);
const turnStream = new Trend('turn_stream', true);
const streamTimeToFirstByte = new Trend('stream_time_to_first_byte', true);
const memoryFailures = new Counter('memory_failures');

export const options = {
  scenarios: {
    conversations: {
      executor: 'constant-vus',
      vus: VUS,
      duration: DURATION,
      gracefulStop: '30s',
    },
  },
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    turn_plain: [`p(95)<${P95_PLAIN_MS}`],
    turn_tool: [`p(95)<${P95_TOOL_MS}`],
    turn_stream: [`p(95)<${P95_STREAM_MS}`],
    memory_failures: ['count<1'],
  },
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)', 'count'],
};

const HEADERS = { 'Content-Type': 'application/json', 'X-API-Key': API_KEY };

export function setup() {
  if (!API_KEY) {
    exec.test.abort('API_KEY is not set: pass the server\'s AGENT_API_KEY as API_KEY');
  }
  const health = http.get(`${BASE_URL}/health`, { tags: { name: 'health' } });
  if (health.status !== 200) {
    exec.test.abort(`${BASE_URL}/health answered ${health.status} (${health.error || 'no error'}): is the server up?`);
  }
  return { model: health.json('model'), offline: health.json('offline_model') };
}

function body(threadId, text) {
  return JSON.stringify({
    input: { messages: [{ role: 'user', content: text }] },
    config: { configurable: { thread_id: threadId } },
  });
}

function textOf(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content.map((part) => (typeof part === 'string' ? part : part && part.text) || '').join('');
  }
  return '';
}

// The AI answer of an /invoke response: the last message this turn added.
function answerOf(res) {
  try {
    const messages = JSON.parse(res.body).output.messages;
    const last = messages[messages.length - 1];
    return last && last.type === 'ai' ? textOf(last.content) : '';
  } catch (e) {
    return '';
  }
}

function invoke(threadId, text, kind, trend) {
  const res = http.post(`${BASE_URL}/agent/invoke`, body(threadId, text), {
    headers: HEADERS,
    tags: { name: 'invoke', turn: kind },
  });
  trend.add(res.timings.duration);
  return res;
}

// Token chunks of an SSE body from /agent/stream_events, concatenated; and whether
// the stream ended cleanly (an `end` event, no `error` event).
function streamedTokens(sseBody) {
  let tokens = '';
  let ended = false;
  let errored = false;
  let event = '';
  for (const line of (sseBody || '').split(/\r?\n/)) {
    if (line.startsWith('event:')) {
      event = line.slice(6).trim();
      if (event === 'end') ended = true;
      if (event === 'error') errored = true;
    } else if (line.startsWith('data:') && event === 'data') {
      let payload;
      try {
        payload = JSON.parse(line.slice(5));
      } catch (e) {
        continue;
      }
      if (payload.event === 'on_chat_model_stream' && payload.data && payload.data.chunk) {
        tokens += textOf(payload.data.chunk.content);
      }
    } else if (line === '') {
      event = '';
    }
  }
  return { tokens, ended, errored };
}

function pause() {
  if (PAUSE_S > 0) sleep(PAUSE_S);
}

export default function () {
  const suffix = Math.random().toString(36).slice(2, 10);
  const threadId = `k6-${__VU}-${__ITER}-${suffix}`;
  // Unique per conversation, so turn 4 can only pass by remembering this thread.
  const name = `${NAMES[(__VU + __ITER) % NAMES.length]}${__VU}x${__ITER}`;

  const first = invoke(threadId, `my name is ${name}`, 'plain', turnPlain);
  check(first, {
    'plain: status 200': (r) => r.status === 200,
    'plain: answer greets the name': (r) => answerOf(r).includes(name),
  });
  pause();

  const tool = invoke(threadId, 'What is 12 * 8?', 'tool', turnTool);
  check(tool, {
    'tool: status 200': (r) => r.status === 200,
    'tool: answer contains 96': (r) => answerOf(r).includes('96'),
  });
  pause();

  const stream = http.post(`${BASE_URL}/agent/stream_events`, body(threadId, 'What is 7 * 6?'), {
    headers: HEADERS,
    tags: { name: 'stream_events', turn: 'stream' },
  });
  turnStream.add(stream.timings.duration);
  streamTimeToFirstByte.add(stream.timings.waiting);
  const streamed = streamedTokens(stream.body);
  check(stream, {
    'stream: status 200': (r) => r.status === 200,
    'stream: ended cleanly': () => streamed.ended && !streamed.errored,
    'stream: tokens contain 42': () => streamed.tokens.includes('42'),
  });
  pause();

  const recall = invoke(threadId, 'what is my name', 'plain', turnPlain);
  const remembered = recall.status === 200 && answerOf(recall).includes(name);
  check(recall, {
    'memory: status 200': (r) => r.status === 200,
    'memory: remembers the name from turn 1': () => remembered,
  });
  // A memory failure is a turn that worked but forgot; failed requests count in
  // http_req_failed instead.
  if (first.status === 200 && recall.status === 200 && !remembered) {
    memoryFailures.add(1, { thread_id: threadId });
  }
  pause();
}

// ---- end-of-test summary: text to stdout, the full data as JSON to SUMMARY_PATH ----

function fmt(value, unit) {
  if (value === undefined || value === null) return '-';
  if (unit === 'ms') return value >= 1000 ? `${(value / 1000).toFixed(2)}s` : `${value.toFixed(1)}ms`;
  if (unit === '%') return `${(value * 100).toFixed(2)}%`;
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function metricLine(name, metric) {
  const v = metric.values;
  const pad = `${name} `.padEnd(30, '.');
  if (metric.type === 'trend') {
    const unit = metric.contains === 'time' ? 'ms' : '';
    return `${pad} avg=${fmt(v.avg, unit)} med=${fmt(v.med, unit)} p(90)=${fmt(v['p(90)'], unit)} `
      + `p(95)=${fmt(v['p(95)'], unit)} p(99)=${fmt(v['p(99)'], unit)} max=${fmt(v.max, unit)} n=${v.count}`;
  }
  if (metric.type === 'rate') return `${pad} ${fmt(v.rate, '%')} (${v.passes} of ${v.passes + v.fails})`;
  if (metric.type === 'counter') return `${pad} ${fmt(v.count)} (${fmt(v.rate)}/s)`;
  return `${pad} ${fmt(v.value)}`;
}

function collectChecks(group, out) {
  for (const c of group.checks || []) out.push(c);
  for (const g of group.groups || []) collectChecks(g, out);
  return out;
}

function textSummary(data) {
  const lines = [];
  const metrics = data.metrics;
  const duration = data.state ? `${(data.state.testRunDurationMs / 1000).toFixed(1)}s` : '?';
  lines.push('', `agent load test: ${BASE_URL}, ${VUS} VUs for ${DURATION} (ran ${duration}), pause ${PAUSE_S}s`);

  let allOk = true;
  lines.push('', 'SLOs (thresholds)');
  for (const name of Object.keys(metrics).sort()) {
    for (const [expr, result] of Object.entries(metrics[name].thresholds || {})) {
      allOk = allOk && result.ok;
      lines.push(`  ${result.ok ? 'PASS' : 'FAIL'}  ${name} ${expr}`);
    }
  }

  lines.push('', 'checks');
  for (const c of collectChecks(data.root_group, [])) {
    lines.push(`  ${c.fails === 0 ? 'ok  ' : 'FAIL'}  ${c.name}: ${c.passes} passed, ${c.fails} failed`);
  }

  lines.push('', 'metrics');
  const shown = ['turn_plain', 'turn_tool', 'turn_stream', 'stream_time_to_first_byte', 'memory_failures',
    'http_req_duration', 'http_req_failed', 'http_reqs', 'iterations', 'checks'];
  for (const name of shown) {
    if (metrics[name]) lines.push(`  ${metricLine(name, metrics[name])}`);
  }
  lines.push('  (stream_time_to_first_byte: first byte of the SSE response, not the first model token)');
  lines.push('', allOk ? 'RESULT: all SLOs met' : 'RESULT: SLO breached', `summary JSON: ${SUMMARY_PATH}`, '');
  return lines.join('\n');
}

export function handleSummary(data) {
  return {
    stdout: textSummary(data),
    [SUMMARY_PATH]: JSON.stringify(data, null, 2),
  };
}
