// Sends events to tron-relay with the npm fluent-logger client: TLS, shared-key handshake,
// requireAckResponse. Usage: node send.js HOST PORT CA SHARED_KEY COUNT MODE [TIMEOUT_MS]
const fs = require('fs');
const logger = require('fluent-logger');
const [host, port, ca, sharedKey, count, mode, timeoutMs] = process.argv.slice(2);
const sender = logger.createFluentSender('npm', {
  host, port: Number(port), timeout: 5.0, reconnectInterval: 1000,
  requireAckResponse: true, ackResponseTimeout: 15000,
  tls: true, tlsOptions: { ca: fs.readFileSync(ca), servername: 'localhost' },
  security: { clientHostname: 'npm-client', sharedKey },
  eventMode: mode,
});
let acked = 0;
let failed = 0;
sender.on('error', (e) => { failed++; console.error('sender error', e && e.message); });
const n = Number(count);
// Event times of ten minutes ago: records older than 7 days before their receive time are quarantined.
const base = Math.floor(Date.now() / 1000) - 600;
for (let i = 0; i < n; i++) {
  const t = new logger.EventTime(base + i, 250000000);
  sender.emit('evt', { i, text: 'from npm, "quoted"' }, t, (err) => {
    if (err) { failed++; console.error('emit error', err.message); } else { acked++; }
    if (acked + failed === n) {
      console.log(JSON.stringify({ acked, failed }));
      sender.end();
      process.exit(failed ? 1 : 0);
    }
  });
}
setTimeout(() => { console.log(JSON.stringify({ acked, failed, timeout: true })); process.exit(2); }, Number(timeoutMs || 60000));
