// One event stream for the whole console, shared by every view: views
// subscribe to the events they care about and reload what they show, so
// nothing needs a page reload. Keeps the newest events for the overview.
import { useEffect, useRef, useState } from '../vendor/preact-hooks.js';
import { openEventStream } from './api.js';

const KEEP = 100;
const listeners = new Set();
const statusListeners = new Set();
let recent = [];
let status = { state: 'connecting', why: null, everLive: false };
let stop = null;

function setStatus(state, why = null) {
  status = { state, why, everLive: status.everLive || state === 'live' };
  for (const listener of statusListeners) listener(status);
}

export function startLive() {
  stopLive();
  recent = [];
  stop = openEventStream({
    query: { recent: 50 },
    onStatus: setStatus,
    onEvent(name, data) {
      if (name === 'lagged') {
        // Too far behind to know what changed: every view reloads.
        for (const listener of listeners) listener({ subject: 'lagged', missed: data.missed });
        return;
      }
      recent = [data, ...recent].slice(0, KEEP);
      for (const listener of listeners) listener(data);
    },
  });
}

export function stopLive() {
  if (stop) stop();
  stop = null;
}

export const recentEvents = () => recent;

// The stream's state for the header: `live`, `connecting`, or `down`.
export function useStreamStatus() {
  const [current, setCurrent] = useState(status);
  useEffect(() => {
    statusListeners.add(setCurrent);
    setCurrent(status);
    return () => statusListeners.delete(setCurrent);
  }, []);
  return current;
}

// Calls `reload` when an event `wanted` takes arrives, at most once per
// `everyMs` (a busy fleet sends hundreds of events a second; the view needs
// the latest state, not each step), and after a `lagged` notice.
export function useLiveReload(wanted, reload, everyMs = 1000) {
  const latest = useRef({ wanted, reload });
  latest.current = { wanted, reload };
  useEffect(() => {
    let timer = null;
    let last = 0;
    const fire = () => {
      timer = null;
      last = Date.now();
      latest.current.reload();
    };
    const listener = (event) => {
      if (event.subject !== 'lagged' && !latest.current.wanted(event)) return;
      if (timer) return;
      timer = setTimeout(fire, Math.max(0, last + everyMs - Date.now()));
    };
    listeners.add(listener);
    return () => {
      listeners.delete(listener);
      if (timer) clearTimeout(timer);
    };
  }, [everyMs]);
}

// Every event as it comes, for lists that grow (the overview's feed).
export function useEvents(handler) {
  const latest = useRef(handler);
  latest.current = handler;
  useEffect(() => {
    const listener = (event) => latest.current(event);
    listeners.add(listener);
    return () => listeners.delete(listener);
  }, []);
}
