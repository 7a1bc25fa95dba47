// A minimal stand-in for the original Node broker, per PROTOCOL.md: NDJSON over a Unix
// socket, no "hello" (unknown_action), and with a secret every request must carry an
// "hmac" that it checks the original's way, by re-serialising the parsed object with
// JSON.stringify. Used to show corral's Python client falls back to Node behaviour.
// Usage: node node_broker_stub.mjs SOCKET [SECRET]; prints "ready" once listening.
import net from 'node:net'
import crypto from 'node:crypto'

const [socketPath, secret] = process.argv.slice(2)
const store = new Map()

function answer (msg) {
  if (secret) {
    const { hmac, ...payload } = msg
    const expected = crypto.createHmac('sha256', secret).update(JSON.stringify(payload)).digest('hex')
    if (typeof hmac !== 'string' || hmac !== expected) return { ok: false, error: 'auth_failed' }
  }
  switch (msg.action) {
    case 'ping': return { ok: true, pong: Date.now() }
    case 'set':
      if (msg.ttl === undefined || msg.ttl === null) return { ok: false, error: 'ttl_required' }
      store.set(msg.key, { value: msg.value, compressed: msg.compressed || false })
      return { ok: true }
    case 'get': {
      const item = store.get(msg.key)
      if (!item) return { ok: false, error: 'not_found' }
      return { ok: true, value: item.value, compressed: item.compressed }
    }
    case 'del': store.delete(msg.key); return { ok: true }
    default: return { ok: false, error: 'unknown_action' }
  }
}

const server = net.createServer(socket => {
  let buffer = ''
  socket.on('data', chunk => {
    buffer += chunk.toString('utf8')
    let idx
    while ((idx = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, idx)
      buffer = buffer.slice(idx + 1)
      let msg
      try { msg = JSON.parse(line) } catch { socket.write('{"ok":false,"error":"invalid_json"}\n'); continue }
      socket.write(JSON.stringify(answer(msg)) + '\n')
    }
  })
  socket.on('error', () => {})
})
server.listen(socketPath, () => console.log('ready'))
process.on('SIGTERM', () => { server.close(); process.exit(0) })
