// The console's only way to the server: the public REST API, called with
// the operator's token exactly as the CLI calls it, and the server-sent
// event stream read over fetch (EventSource cannot send a bearer token).
import { createParser } from '../vendor/eventsource-parser/parse.js';

const TOKEN_KEY = 'uplift.token';

// The token lives in this tab's session storage: gone when the tab closes,
// never in a URL (which ends up in history and logs) nor in a cookie (which
// the browser would send on its own).
export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  save: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

// What the server refused or why it could not be asked: `kind` is the
// API's stable error kind, `message` its sentence for the operator.
export class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

let unauthorized = () => {};
// Called when the server no longer takes the session's token (revoked or
// expired): the console goes back to the login form.
export function onUnauthorized(handler) {
  unauthorized = handler;
}

function urlOf(path, query) {
  const url = new URL(path, location.origin);
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== undefined && value !== null && value !== '') url.searchParams.set(key, value);
  }
  return url;
}

// One API call. `body` goes as JSON, `bytes` as they are; the answer's JSON
// is returned, or an ApiError thrown.
export async function api(method, path, { query, body, bytes, token, signal } = {}) {
  const headers = { Authorization: `Bearer ${token ?? session.token() ?? ''}` };
  let payload;
  if (bytes !== undefined) {
    payload = bytes;
    headers['Content-Type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    payload = JSON.stringify(body);
    headers['Content-Type'] = 'application/json';
  }
  let response;
  try {
    response = await fetch(urlOf(path, query), { method, headers, body: payload, signal, cache: 'no-store' });
  } catch (error) {
    if (error.name === 'AbortError') throw error;
    throw new ApiError(0, 'unreachable', `The server did not answer (${error.message}). Check that it runs and that this page's address reaches it.`);
  }
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, data?.kind ?? `http_${response.status}`, data?.message ?? (text || response.statusText));
    if (response.status === 401 && token === undefined) unauthorized(error);
    throw error;
  }
  return data;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Keeps one event stream open: reconnects with a growing pause when it
// drops, and resumes after the last event it got (`Last-Event-ID`), so a
// short outage loses nothing the server still holds. `onStatus` hears
// `connecting`, `live` and `down` (with why). Returns a function that stops it.
export function openEventStream({ query, onEvent, onStatus }) {
  let stopped = false;
  let controller = null;
  let lastId = null;
  let pause = 1000;
  // The server sends a keep-alive comment every 15 s: a silent minute
  // means the connection died without a word (a laptop waking up, a proxy).
  const SILENCE_MS = 45000;

  async function connect() {
    controller = new AbortController();
    let heard = Date.now();
    const watchdog = setInterval(() => {
      if (Date.now() - heard > SILENCE_MS) controller.abort(new Error('no word from the server in 45 s'));
    }, 5000);
    try {
      const headers = { Authorization: `Bearer ${session.token() ?? ''}`, Accept: 'text/event-stream' };
      if (lastId !== null) headers['Last-Event-ID'] = lastId;
      const response = await fetch(urlOf('/api/v1/events', lastId === null ? query : {}), {
        headers,
        signal: controller.signal,
        cache: 'no-store',
      });
      if (!response.ok) {
        let data = null;
        try {
          data = await response.json();
        } catch {
          data = null;
        }
        throw new ApiError(response.status, data?.kind ?? `http_${response.status}`, data?.message ?? response.statusText);
      }
      onStatus('live');
      pause = 1000;
      const parser = createParser({
        onEvent(message) {
          if (message.id) lastId = message.id;
          let data = null;
          try {
            data = JSON.parse(message.data);
          } catch {
            return;
          }
          onEvent(message.event ?? 'message', data);
        },
      });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        heard = Date.now();
        parser.feed(value);
      }
      throw new Error('the server closed the stream');
    } finally {
      clearInterval(watchdog);
    }
  }

  (async () => {
    while (!stopped) {
      onStatus('connecting');
      try {
        await connect();
      } catch (error) {
        if (stopped) return;
        if (error.status === 401) {
          unauthorized(error);
          return;
        }
        const why = error.message || String(controller?.signal?.reason ?? 'the connection dropped');
        onStatus('down', why);
        await sleep(pause);
        pause = Math.min(pause * 2, 15000);
      }
    }
  })();

  return () => {
    stopped = true;
    controller?.abort();
  };
}
