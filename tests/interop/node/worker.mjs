// An official npm iii-sdk worker driven line by line, for the interop tests.
//
//   node worker.mjs <package> <engine-url> <worker-name>
//
// <package> is one of the aliases in package.json (iii-sdk-09, iii-sdk-011,
// iii-sdk-022): the SDK is used unmodified, through its public API only. 0.22 dropped
// the client's list*/onFunctionsAvailable/createChannel methods: for it, the same engine
// functions and trigger are used through trigger()/registerTrigger(), and createChannel
// comes from 'iii-sdk/helpers', as its docs say.
//
// stdin: one JSON command per line, {"id": n, "op": ..., ...}. Each gets exactly one
// reply line {"reply": n, "ok": true, ...} or {"reply": n, "ok": false, "error": ...}.
// stdout: replies, and one JSON line per event ({"event": ...}); anything else on
// stdout (the SDK's own console output, e.g. "[OTel] Connected to engine at ...") is
// passed through as is.
//
// Ops:
//   register_function {function_id, description?, http?, fail?}: the handler prints
//       {"event": "invoked", function_id, data} and returns
//       {"handled_by": <worker-name>, "sdk": <version>, "data": data}; if data.call is
//       {function_id, payload}, it first calls that function and adds its result as
//       "nested" (a call made from inside a handler). With http, it returns that
//       as an HTTP response instead: {"status_code": 201, "body": ...}; http "buffer"
//       returns a PNG signature as a Buffer body, http "xml" the string "<ok/>" as
//       text/xml.
//   unregister_function {function_id}
//   call {function_id, payload, void?, metadata?} -> {result}; the handler's event
//       carries the invocation metadata it was given (0.22: 2nd argument), or null
//   register_trigger {type, function_id, config, metadata?} -> {}
//   unregister_trigger {trigger_id}: the index the register_trigger reply gave
//   register_trigger_type {type_id, description, refuse?}: a provider (refusing
//       every trigger with the message refuse, when given) that prints
//       {"event": "trigger_registered", id, function_id, config, metadata} and
//       "trigger_unregistered"
//   fire {type_id, payload} -> {results}: call the function of every trigger
//       registered on our type, as a provider does when its event happens
//   list_functions / list_workers / list_triggers {include_internal?} /
//       list_trigger_types {include_internal?} (0.11+) -> {result}
//   register_http_function {function_id, url, description?}: an HTTP-invoked
//       function (the engine POSTs the call to url)
//   watch_functions: onFunctionsAvailable; prints {"event": "functions_available",
//       function_ids} on each notice
//   channel_send {function_id, size}: create a data channel, call the function with
//       {reader: <ref>} while writing <size> bytes (byte i is i % 251) into the
//       channel -> {result}
//   channel_receive {function_id}: create a data channel, call the function with
//       {writer: <ref>} and read the channel to its end -> {result, size, sha256}
//   shutdown: iii.shutdown() (flushes OTel), reply, exit 0
//
// Env: III_TEST_METRICS_EXPORT_INTERVAL_MS, when set, is the SDK's OTel
// metricsExportIntervalMs (how often it sends its worker gauges; 60 s by default).
// III_TEST_HEADERS, when set, is a JSON object passed as the SDK's `headers` option
// (the handshake headers, e.g. {"Authorization": "Bearer ..."}).

import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { createInterface } from 'node:readline'

const [packageName, url, workerName] = process.argv.slice(2)
if (!packageName || !url || !workerName) {
  console.error('usage: node worker.mjs <package> <engine-url> <worker-name>')
  process.exit(2)
}

// Not require(`${packageName}/package.json`): the SDK's "exports" do not list it.
const manifest = new URL(`./node_modules/${packageName}/package.json`, import.meta.url)
const sdkVersion = JSON.parse(readFileSync(manifest, 'utf8')).version
const sdk = await import(packageName)
const modern = !sdkVersion.startsWith('0.9.') // registerFunction(id, handler, options)

function emit(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`)
}

const metricsInterval = Number(process.env.III_TEST_METRICS_EXPORT_INTERVAL_MS)
const headers = process.env.III_TEST_HEADERS ? JSON.parse(process.env.III_TEST_HEADERS) : null
const iii = sdk.registerWorker(url, {
  workerName,
  ...(headers && { headers }),
  ...(metricsInterval > 0 && { otel: { metricsExportIntervalMs: metricsInterval } }),
})
// 0.22+: createChannel is a free function of the SDK's helpers entry point.
const createChannel = typeof iii.createChannel === 'function'
  ? () => iii.createChannel()
  : (await import(`${packageName}/helpers`)).createChannel.bind(null, iii)

// What the list* helpers of 0.9/0.11 do: call the engine function, unwrap its list.
async function engineList(method, functionId, key, payload = {}) {
  if (method && typeof iii[method] === 'function') return iii[method](...Object.values(payload))
  return (await iii.trigger({ function_id: functionId, payload }))[key]
}

const triggers = []
const providedTriggers = new Map() // trigger id -> {type_id, function_id, config}
const functionRefs = new Map()

async function handler(functionId, data, http, metadata, fail) {
  // 0.22 passes the invocation metadata as the handler's 2nd argument.
  emit({ event: 'invoked', function_id: functionId, data, metadata: metadata ?? null })
  if (fail) throw new Error('always fails')
  const result = { handled_by: workerName, sdk: sdkVersion, data }
  if (data && typeof data === 'object' && data.call) {
    result.nested = await iii.trigger({
      function_id: data.call.function_id,
      payload: data.call.payload,
    })
  }
  if (http === 'buffer') {
    // A binary answer as Node code writes it: a Buffer body (JSON.stringify makes it
    // {"type": "Buffer", "data": [...]} on the wire).
    return { status_code: 200, headers: { 'content-type': 'image/png' },
             body: Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]) }
  }
  if (http === 'xml') {
    return { status_code: 200, headers: { 'Content-Type': 'text/xml' }, body: '<ok/>' }
  }
  return http ? { status_code: 201, body: result } : result
}

function registerFunction(functionId, description, http, fail) {
  const fn = (data, metadata) => handler(functionId, data, http, metadata, fail)
  return modern
    ? iii.registerFunction(functionId, fn, { description })
    : iii.registerFunction({ id: functionId, description }, fn)
}

const ops = {
  async register_function({ function_id, description, http, fail }) {
    functionRefs.set(function_id, registerFunction(function_id, description, http, fail))
    return {}
  },
  async unregister_function({ function_id }) {
    functionRefs.get(function_id).unregister()
    functionRefs.delete(function_id)
    return {}
  },
  async call({ function_id, payload, void: isVoid, metadata, enqueue }) {
    const request = { function_id, payload }
    if (enqueue) request.action = sdk.TriggerAction.Enqueue({ queue: enqueue })
    if (metadata !== undefined) request.metadata = metadata
    if (isVoid) request.action = sdk.TriggerAction.Void()
    return { result: (await iii.trigger(request)) ?? null }
  },
  async register_trigger({ type, function_id, config, metadata }) {
    const trigger = { type, function_id, config }
    if (metadata !== undefined) trigger.metadata = metadata
    triggers.push(iii.registerTrigger(trigger))
    return { trigger_id: triggers.length - 1 }
  },
  async unregister_trigger({ trigger_id }) {
    triggers[trigger_id].unregister()
    return {}
  },
  async register_trigger_type({ type_id, description, refuse }) {
    iii.registerTriggerType({ id: type_id, description }, {
      async registerTrigger({ id, function_id, config, metadata }) {
        if (refuse) throw new Error(refuse)
        providedTriggers.set(id, { type_id, function_id, config })
        emit({ event: 'trigger_registered', type_id, id, function_id, config, metadata: metadata ?? null })
      },
      async unregisterTrigger({ id, function_id }) {
        providedTriggers.delete(id)
        emit({ event: 'trigger_unregistered', type_id, id, function_id: function_id ?? null })
      },
    })
    return {}
  },
  async fire({ type_id, payload }) {
    const results = []
    for (const [id, trigger] of providedTriggers) {
      if (trigger.type_id !== type_id) continue
      results.push({
        trigger_id: id,
        result: await iii.trigger({ function_id: trigger.function_id, payload }),
      })
    }
    return { results }
  },
  async list_functions() {
    return { result: await engineList('listFunctions', 'engine::functions::list', 'functions') }
  },
  async list_workers() {
    return { result: await engineList('listWorkers', 'engine::workers::list', 'workers') }
  },
  async list_triggers({ include_internal }) {
    // 0.22 (reference 0.13+ names): instances are engine::registered-triggers::list.
    if (typeof iii.listTriggers !== 'function') {
      return {
        result: await engineList(null, 'engine::registered-triggers::list',
          'registered_triggers', { include_internal: include_internal ?? false }),
      }
    }
    return {
      result: await engineList('listTriggers', 'engine::triggers::list', 'triggers',
        { include_internal: include_internal ?? false }),
    }
  },
  async list_trigger_types({ include_internal }) {
    if (sdkVersion.startsWith('0.9.')) {
      throw new Error(`iii-sdk ${sdkVersion} has no listTriggerTypes`)
    }
    // 0.22 (reference 0.13+ names): trigger types are engine::triggers::list.
    if (typeof iii.listTriggerTypes !== 'function') {
      return {
        result: await engineList(null, 'engine::triggers::list', 'triggers',
          { include_internal: include_internal ?? false }),
      }
    }
    return {
      result: await engineList('listTriggerTypes', 'engine::trigger-types::list',
        'trigger_types', { include_internal: include_internal ?? false }),
    }
  },
  async register_http_function({ function_id, url, description }) {
    const invocation = { url, method: 'POST', timeout_ms: 10000 }
    functionRefs.set(function_id, modern
      ? iii.registerFunction(function_id, invocation, { description })
      : iii.registerFunction({ id: function_id, description }, invocation))
    return {}
  },
  async watch_functions() {
    const notice = (functions) => {
      emit({ event: 'functions_available', function_ids: functions.map((f) => f.function_id).sort() })
    }
    if (typeof iii.onFunctionsAvailable === 'function') {
      iii.onFunctionsAvailable(notice)
    } else {
      // What onFunctionsAvailable does in 0.11: a function bound to the engine's trigger.
      const functionId = `node.on_functions_available.${workerName}`
      iii.registerFunction(functionId, async ({ functions }) => { notice(functions); return null })
      iii.registerTrigger({ type: 'engine::functions-available', function_id: functionId, config: {} })
    }
    return {}
  },
  async channel_send({ function_id, size }) {
    const channel = await createChannel()
    const data = Buffer.alloc(size)
    for (let i = 0; i < size; i++) data[i] = i % 251
    const call = iii.trigger({ function_id, payload: { reader: channel.readerRef } })
    channel.writer.stream.end(data)
    return { result: await call }
  },
  async channel_receive({ function_id }) {
    const channel = await createChannel()
    const call = iii.trigger({ function_id, payload: { writer: channel.writerRef } })
    const received = await channel.reader.readAll()
    return {
      result: (await call) ?? null,
      size: received.length,
      sha256: createHash('sha256').update(received).digest('hex'),
    }
  },
  async shutdown() {
    await iii.shutdown()
    return {}
  },
}

function describe(error) {
  // 0.22+ throws an InvocationError (an Error with the engine's code)
  if (error instanceof Error) {
    return typeof error.code === 'string'
      ? { code: error.code, message: error.message }
      : { message: error.message }
  }
  return error // an iii ErrorBody {code, message}
}

async function run(command) {
  const op = ops[command.op]
  try {
    if (!op) throw new Error(`unknown op ${command.op}`)
    emit({ reply: command.id, ok: true, ...(await op(command)) })
  } catch (error) {
    emit({ reply: command.id, ok: false, error: describe(error) })
  }
  if (command.op === 'shutdown') process.exit(0)
}

emit({ event: 'started', sdk: sdkVersion, name: workerName })
const input = createInterface({ input: process.stdin })
input.on('line', (line) => {
  if (line.trim()) run(JSON.parse(line))
})
// The test went away: leave as a worker does, closing the socket.
input.on('close', () => {
  iii.shutdown().finally(() => process.exit(0))
})
