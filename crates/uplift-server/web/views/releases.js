// Releases: what the server holds, and uploading a release directory
// (made by `uplift release create`) from the browser, as
// `uplift release upload` does: ask which chunks the server lacks, send
// those, then the chunk index, then the signed manifest. The server checks
// every piece against its digest and the manifest's signature itself.
import { useState } from '../vendor/preact-hooks.js';
import { api, ApiError } from '../lib/api.js';
import { Badge, bytes, eachLimited, ErrorNote, html, may, useResource, when } from '../lib/ui.js';

const UPLOADS_AT_ONCE = 4;

// The files of the picked directory by their path inside it (the browser
// gives `dir/chunks/<hash>.zst`; the first component is the directory).
function releaseFiles(fileList) {
  const files = new Map();
  for (const file of fileList) {
    const path = (file.webkitRelativePath || file.name).split('/').slice(1).join('/');
    files.set(path, file);
  }
  return files;
}

function hashesIn(files, dir) {
  const hashes = [];
  for (const path of files.keys()) {
    const match = path.match(new RegExp(`^${dir}/([0-9a-f]{64})\\.zst$`));
    if (match) hashes.push(match[1]);
  }
  return hashes;
}

async function uploadRelease(files, onProgress) {
  const manifestFile = files.get('manifest.json');
  if (!manifestFile) throw new ApiError(0, 'bad_request', 'This directory has no manifest.json: pick the directory `uplift release create` wrote.');
  const manifestText = await manifestFile.text();
  let manifest;
  try {
    manifest = JSON.parse(JSON.parse(manifestText).signed);
  } catch (e) {
    throw new ApiError(0, 'bad_request', `manifest.json is not a signed Uplift manifest (${e.message}).`);
  }
  const chunks = hashesIn(files, 'chunks');
  const patches = hashesIn(files, 'patches');
  const missing = await api('POST', '/api/v1/chunks/missing', { body: { chunks, patches } });
  const work = [
    ...missing.missing.map((hash) => ({ file: files.get(`chunks/${hash}.zst`), path: `/api/v1/chunks/${hash}`, what: `chunk ${hash}` })),
    ...missing.missing_patches.map((hash) => ({ file: files.get(`patches/${hash}.zst`), path: `/api/v1/patches/${hash}`, what: `patch ${hash}` })),
  ];
  const index = manifest.chunk_index;
  if (index) {
    const file = files.get('chunks.idx');
    if (!file) throw new ApiError(0, 'bad_request', 'The manifest names a chunk index, but chunks.idx is not in the directory.');
    work.push({ file, path: `/api/v1/indexes/${index.sha256}`, what: 'the chunk index', last: true });
  }
  const total = work.reduce((n, w) => n + (w.file?.size ?? 0), 0);
  let sent = 0;
  onProgress({ sent, total, step: `${missing.missing.length} of ${chunks.length} chunks to send` });
  const send = async (w) => {
    if (!w.file) throw new ApiError(0, 'bad_request', `${w.what} is not in the directory`);
    await api('PUT', w.path, { bytes: await w.file.arrayBuffer() });
    sent += w.file.size;
    onProgress({ sent, total, step: `sent ${w.what.slice(0, 20)}…` });
  };
  const failures = await eachLimited(work.filter((w) => !w.last), UPLOADS_AT_ONCE, send);
  if (failures.length) throw failures[0].error;
  for (const w of work.filter((w) => w.last)) await send(w);
  onProgress({ sent, total, step: 'storing the manifest' });
  return api('POST', '/api/v1/releases', { bytes: new TextEncoder().encode(manifestText) });
}

function Upload({ onUploaded }) {
  const [files, setFiles] = useState(null);
  const [progress, setProgress] = useState(null);
  const [error, setError] = useState(null);
  const [done, setDone] = useState(null);
  const start = async (e) => {
    e.preventDefault();
    setError(null);
    setDone(null);
    try {
      const release = await uploadRelease(files, setProgress);
      setDone(release);
      onUploaded();
    } catch (err) {
      setError(err);
    } finally {
      setProgress(null);
    }
  };
  const percent = progress && progress.total ? Math.round((100 * progress.sent) / progress.total) : 0;
  return html`<form class="card upload" onSubmit=${start} id="release-upload">
    <h2>Upload a release</h2>
    <p>Pick the directory <code>uplift release create</code> wrote (manifest.json and chunks/). Only the chunks the server lacks are sent.</p>
    <input type="file" webkitdirectory multiple id="release-dir" onChange=${(e) => setFiles(releaseFiles(e.target.files))} />
    <button type="submit" class="primary" disabled=${!files || progress}>Upload</button>
    ${progress
      ? html`<div class="upload-progress">
          <progress max="100" value=${percent} id="upload-progress">${percent} %</progress>
          <span>${percent} % · ${bytes(progress.sent)} of ${bytes(progress.total)} · ${progress.step}</span>
        </div>`
      : null}
    <${ErrorNote} error=${error} title="Upload failed" />
    ${done ? html`<div class="note ok" role="status" id="upload-done">Release ${done.version} for ${done.device_type} is stored.</div>` : null}
  </form>`;
}

export function Releases({ caller }) {
  const releases = useResource(() => api('GET', '/api/v1/releases'), []);
  const list = [...(releases.data ?? [])].reverse();
  return html`<section>
    <h1>Releases</h1>
    <${ErrorNote} error=${releases.error} title="Could not list releases" />
    <div class="table-wrap">
      <table id="release-table">
        <thead><tr><th>Version</th><th>Device type</th><th>Image</th><th>Chunks</th><th>Stored</th><th>Signed by</th><th>Expires</th><th>Uploaded</th><th>Health</th></tr></thead>
        <tbody>
          ${list.map(
            (r) => html`<tr key=${`${r.device_type}/${r.version}`}>
              <td><strong>${r.version}</strong></td>
              <td>${r.device_type}</td>
              <td>${bytes(r.image_size)}</td>
              <td>${r.chunks}</td>
              <td>${bytes(r.stored_bytes)}</td>
              <td>${(r.key_ids ?? []).map((k) => html`<code class="key">${k}</code> `)}</td>
              <td>${r.expires_at ? html`${when(r.expires_at)}${new Date(r.expires_at) < new Date() ? html` <${Badge} tone="bad">expired<//>` : null}` : '–'}</td>
              <td>${when(r.created_at)}</td>
              <td>${r.damaged_chunks ? html`<${Badge} tone="bad">${r.damaged_chunks} damaged chunks<//>` : html`<${Badge} tone="ok">intact<//>`}</td>
            </tr>`,
          )}
        </tbody>
      </table>
    </div>
    ${releases.data && !list.length ? html`<p class="empty">No release yet.</p>` : null}
    ${may(caller, 'release') ? html`<${Upload} onUploaded=${releases.reload} />` : null}
  </section>`;
}
