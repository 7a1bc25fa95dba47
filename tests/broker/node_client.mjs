// A Node.js client written from PROTOCOL.md, the way @ephemeral-broker/core's client talks:
// one connection per request, one JSON line each way, gzip+base64 values with
// "compressed": true, and (with a secret) an "hmac" over JSON.stringify(payload).
// Usage: node node_client.mjs SOCKET [SECRET] < python_value.json ; prints a JSON report.
import net from 'node:net'
import crypto from 'node:crypto'
import zlib from 'node:zlib'
import fs from 'node:fs'

const [socketPath, secret] = process.argv.slice(2)

function request (payload) {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath)
    let buffer = ''
    socket.on('connect', () => {
      let message = payload
      if (secret) {
        const hmac = crypto.createHmac('sha256', secret).update(JSON.stringify(payload)).digest('hex')
        message = { ...payload, hmac }
      }
      socket.write(JSON.stringify(message) + '\n')
    })
    socket.on('data', chunk => {
      buffer += chunk.toString('utf8')
      const idx = buffer.indexOf('\n')
      if (idx >= 0) {
        socket.end()
        resolve(JSON.parse(buffer.slice(0, idx)))
      }
    })
    socket.on('error', reject)
  })
}

const compress = value => zlib.gzipSync(Buffer.from(JSON.stringify(value), 'utf8')).toString('base64')
const decompress = text => JSON.parse(zlib.gunzipSync(Buffer.from(text, 'base64')).toString('utf8'))

async function get (key) {
  const response = await request({ action: 'get', key })
  if (!response.ok) return { error: response.error }
  return { value: response.compressed ? decompress(response.value) : response.value }
}

const report = {}
report.ping = await request({ action: 'ping' })
report.setPlain = await request({ action: 'set', key: 'node-plain', value: { from: 'node', n: 1 }, ttl: 60000 })
const big = { from: 'node', rows: Array.from({ length: 300 }, (_, i) => ({ i, s: 'é'.repeat(5) })) }
const packed = compress(big)
report.setCompressed = await request({
  action: 'set', key: 'node-big', value: packed, ttl: 60000, compressed: true,
  beforeSize: JSON.stringify(big).length, afterSize: packed.length
})
report.pythonBig = await get('python-big')
report.expectedPythonBig = JSON.parse(fs.readFileSync(0, 'utf8'))
report.missing = await get('nothing-here')
report.list = await request({ action: 'list' })
report.stats = await request({ action: 'stats' })
report.health = await request({ action: 'health' })
report.metrics = await request({ action: 'metrics' })
report.lease = await request({ action: 'lease', key: 'pool', workerId: 'node-worker', ttl: 60000 })
report.release = await request({ action: 'release', workerId: 'node-worker' })
report.noTtl = await request({ action: 'set', key: 'x', value: 1 })
process.stdout.write(JSON.stringify(report))
