#!/usr/bin/env node
// A Headwater client in Node.js, from the gRPC contract alone (proto/headwater/v1, loaded at run time).
//
// Creates a topic, produces keyed records the simple way (Publish, through any node) and the native
// way (RecordBatch bytes built here and sent as they are to each partition's leader with Produce),
// reads them back with Subscribe and Fetch, and checks every record, the partitioner and the batch
// codec against the golden vectors. Exits 0 only when every check passed.
//
//   node example.js [--topic NAME] [--partitions N] [--golden golden.json] [--proto DIR] BOOTSTRAP
'use strict';

const fs = require('fs');
const path = require('path');
const zlib = require('zlib');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const CALL_TIMEOUT_MS = 30000;

// ---------------------------------------------------------------- the batch format (records.proto)

const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC32C (Castagnoli) of the buffers, one after another, as an unsigned number. */
function crc32c(...buffers) {
  let c = 0xffffffff;
  for (const b of buffers) for (const x of b) c = CRC32C_TABLE[(c ^ x) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

const COMPRESSION = { NONE: 0, GZIP: 1, LZ4: 2, ZSTD: 3 };
const COMPRESSION_NAMES = ['COMPRESSION_TYPE_NONE', 'COMPRESSION_TYPE_GZIP', 'COMPRESSION_TYPE_LZ4', 'COMPRESSION_TYPE_ZSTD'];

function compressionNumber(c) {
  return typeof c === 'number' ? c : COMPRESSION_NAMES.indexOf(c);
}

/** The 44 big-endian bytes the CRC covers before the records bytes. */
function crcHeader(b) {
  const h = Buffer.alloc(44);
  h.writeInt32BE(b.lastOffsetDelta, 0);
  h.writeBigInt64BE(BigInt(b.firstTimestampMs), 4);
  h.writeBigInt64BE(BigInt(b.maxTimestampMs), 12);
  h.writeBigInt64BE(BigInt(b.producerId), 20);
  h.writeInt32BE(b.producerEpoch, 28);
  h.writeInt32BE(b.baseSequence, 32);
  h.writeInt32BE(b.compression, 36);
  h.writeInt32BE(b.recordCount, 40);
  return h;
}

function compress(c, data) {
  if (c === COMPRESSION.NONE) return data;
  if (c === COMPRESSION.GZIP) return zlib.gzipSync(data);
  throw new Error(`this example does not compress with ${COMPRESSION_NAMES[c]}`);
}

/**
 * An LZ4 frame (the format's magic 04 22 4d 18, then blocks) inflated: the LZ4 frame and block
 * formats are short enough to read without a package. Checksums are not verified.
 */
function lz4FrameDecompress(data) {
  if (data.readUInt32LE(0) !== 0x184d2204) throw new Error('not an LZ4 frame');
  const flg = data[4];
  let pos = 6 + (flg & 0x08 ? 8 : 0) + (flg & 0x01 ? 4 : 0) + 1; // FLG, BD, content size, dict id, HC
  const out = [];
  let n = 0;
  for (;;) {
    const size = data.readUInt32LE(pos);
    pos += 4;
    if (size === 0) break; // end mark
    const len = size & 0x7fffffff;
    const end = pos + len;
    if (size & 0x80000000) {
      for (let i = pos; i < end; i++) out[n++] = data[i]; // stored uncompressed
    } else {
      let i = pos;
      while (i < end) {
        const token = data[i++];
        let lit = token >> 4;
        if (lit === 15) for (let b = 255; b === 255; lit += b) b = data[i++];
        for (let k = 0; k < lit; k++) out[n++] = data[i++];
        if (i >= end) break; // the last sequence has literals only
        const offset = data[i] | (data[i + 1] << 8);
        i += 2;
        let match = token & 15;
        if (match === 15) for (let b = 255; b === 255; match += b) b = data[i++];
        match += 4;
        for (let k = 0; k < match; k++, n++) out[n] = out[n - offset]; // may overlap
      }
    }
    pos = end + (flg & 0x10 ? 4 : 0); // block checksum
  }
  return Buffer.from(out);
}

/**
 * Inflates a records payload; null for zstd where this Node.js cannot (before Node 22.15), which
 * the example then leaves to the node (decode: true).
 */
function decompress(c, data) {
  if (c === COMPRESSION.NONE) return data;
  if (c === COMPRESSION.GZIP) return zlib.gunzipSync(data);
  if (c === COMPRESSION.LZ4) return lz4FrameDecompress(data);
  if (c === COMPRESSION.ZSTD && zlib.zstdDecompressSync) return zlib.zstdDecompressSync(data);
  return null;
}

// A protobuf writer and reader, enough for Records, RecordBatch and ProduceRequest: the native path
// sends the bytes it built, so it writes the wire format itself (fields in number order, zero
// scalars left out, presence kept for optional fields: what every protobuf library writes).
function varint(n) {
  let v = BigInt.asUintN(64, BigInt(n)); // negative int32/int64: ten bytes, two's complement
  const out = [];
  while (v > 0x7fn) {
    out.push(Number(v & 0x7fn) | 0x80);
    v >>= 7n;
  }
  out.push(Number(v));
  return Buffer.from(out);
}

class Writer {
  constructor() {
    this.parts = [];
  }
  int(field, n) {
    if (BigInt(n) !== 0n) this.parts.push(varint(field << 3), varint(n));
    return this;
  }
  fixed32(field, n) {
    if (n !== 0) {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(n >>> 0);
      this.parts.push(varint((field << 3) | 5), b);
    }
    return this;
  }
  // present: write even when empty (optional fields, embedded messages).
  bytes(field, b, present = false) {
    if (b == null || (b.length === 0 && !present)) return this;
    this.parts.push(varint((field << 3) | 2), varint(b.length), b);
    return this;
  }
  string(field, s) {
    return this.bytes(field, Buffer.from(s, 'utf8'));
  }
  finish() {
    return Buffer.concat(this.parts);
  }
}

/** The fields of a serialized message: {field: [values]} (varints as BigInt, bytes as Buffer). */
function readFields(buf) {
  const fields = {};
  let pos = 0;
  const readVarint = () => {
    let v = 0n;
    let shift = 0n;
    for (;;) {
      if (pos >= buf.length) throw new Error('truncated varint');
      const x = buf[pos++];
      v |= BigInt(x & 0x7f) << shift;
      if (!(x & 0x80)) return v;
      shift += 7n;
    }
  };
  while (pos < buf.length) {
    const tag = Number(readVarint());
    const field = tag >>> 3;
    let value;
    switch (tag & 7) {
      case 0: value = readVarint(); break;
      case 1: value = buf.subarray(pos, pos + 8); pos += 8; break;
      case 5: value = buf.readUInt32LE(pos); pos += 4; break;
      case 2: {
        const n = Number(readVarint());
        if (pos + n > buf.length) throw new Error('truncated field');
        value = buf.subarray(pos, pos + n);
        pos += n;
        break;
      }
      default: throw new Error(`wire type ${tag & 7}`);
    }
    (fields[field] = fields[field] || []).push(value);
  }
  return fields;
}

const int32 = (v) => (v === undefined ? 0 : Number(BigInt.asIntN(32, v)));
const int64 = (v) => (v === undefined ? 0 : Number(BigInt.asIntN(64, v)));
const one = (f, n) => (f[n] ? f[n][f[n].length - 1] : undefined);

/** A serialized Records message: [{offsetDelta, timestampDeltaMs, key, value, headers}], absent as null. */
function parseRecords(buf) {
  return (readFields(buf)[1] || []).map((rb) => {
    const r = readFields(rb);
    return {
      offsetDelta: int32(one(r, 1)),
      timestampDeltaMs: int64(one(r, 2)),
      key: one(r, 3) === undefined ? null : Buffer.from(one(r, 3)),
      value: one(r, 4) === undefined ? null : Buffer.from(one(r, 4)),
      headers: (r[5] || []).map((hb) => {
        const h = readFields(hb);
        return { key: one(h, 1) === undefined ? '' : one(h, 1).toString('utf8'), value: one(h, 2) === undefined ? null : Buffer.from(one(h, 2)) };
      }),
    };
  });
}

/** A serialized RecordBatch's fields (camelCase, numbers), for golden batches. */
function parseBatch(buf) {
  const f = readFields(buf);
  return {
    baseOffset: int64(one(f, 1)),
    lastOffsetDelta: int32(one(f, 3)),
    firstTimestampMs: int64(one(f, 4)),
    maxTimestampMs: int64(one(f, 5)),
    producerId: int64(one(f, 6)),
    producerEpoch: int32(one(f, 7)),
    baseSequence: int32(one(f, 8)),
    compression: int32(one(f, 9)),
    recordCount: int32(one(f, 10)),
    crc: one(f, 11) === undefined ? 0 : one(f, 11),
    records: one(f, 12) === undefined ? Buffer.alloc(0) : Buffer.from(one(f, 12)),
    timestampType: int32(one(f, 13)),
  };
}

/**
 * A producer's batch (base_offset 0) as bytes: offset deltas 0..n-1, timestamps as deltas from the
 * first record's, max_timestamp_ms the largest, the CRC over the 44-byte header and the records.
 * Records: [{timestampMs, key, value, headers: [{key, value}]}], absent key or value as null.
 */
function buildBatch(recs, compression, producerId = -1, producerEpoch = -1, baseSequence = -1) {
  const first = recs[0].timestampMs;
  const payload = new Writer();
  recs.forEach((r, i) => {
    const w = new Writer().int(1, i).int(2, r.timestampMs - first).bytes(3, r.key, true).bytes(4, r.value, true);
    for (const h of r.headers) w.bytes(5, new Writer().string(1, h.key).bytes(2, h.value, true).finish(), true);
    payload.bytes(1, w.finish(), true);
  });
  const b = {
    lastOffsetDelta: recs.length - 1,
    firstTimestampMs: first,
    maxTimestampMs: Math.max(...recs.map((r) => r.timestampMs)),
    producerId,
    producerEpoch,
    baseSequence,
    compression,
    recordCount: recs.length,
    records: compress(compression, payload.finish()),
  };
  b.crc = crc32c(crcHeader(b), b.records);
  const bytes = new Writer()
    .int(3, b.lastOffsetDelta).int(4, b.firstTimestampMs).int(5, b.maxTimestampMs).int(6, b.producerId)
    .int(7, b.producerEpoch).int(8, b.baseSequence).int(9, b.compression).int(10, b.recordCount)
    .fixed32(11, b.crc).bytes(12, b.records, true).finish();
  return { batch: b, bytes };
}

/** A stored batch's records with absolute offsets and timestamps (LogAppendTime: max_timestamp_ms). */
function decodeBatch(b) {
  const raw = decompress(b.compression, b.records);
  if (raw === null) throw new Error(`cannot inflate ${COMPRESSION_NAMES[b.compression]} here`);
  const appendTime = b.timestampType === 1;
  return parseRecords(raw).map((r) => ({
    offset: b.baseOffset + r.offsetDelta,
    timestampMs: appendTime ? b.maxTimestampMs : b.firstTimestampMs + r.timestampDeltaMs,
    key: r.key,
    value: r.value,
    headers: r.headers,
  }));
}

/** Kafka's Utils.murmur2: 32-bit MurmurHash2 with seed 0x9747b28c, as a signed int. */
function murmur2(data) {
  const m = 0x5bd1e995;
  const n = data.length;
  let h = (0x9747b28c ^ n) | 0;
  const n4 = n & ~3;
  for (let i = 0; i < n4; i += 4) {
    let k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24);
    k = Math.imul(k, m);
    k ^= k >>> 24;
    k = Math.imul(k, m);
    h = Math.imul(h, m) ^ k;
  }
  switch (n & 3) {
    case 3: h ^= data[n4 + 2] << 16; // falls through
    case 2: h ^= data[n4 + 1] << 8; // falls through
    case 1: h ^= data[n4]; h = Math.imul(h, m);
  }
  h ^= h >>> 13;
  h = Math.imul(h, m);
  h ^= h >>> 15;
  return h | 0;
}

function partitionForKey(key, partitions) {
  return (murmur2(key) & 0x7fffffff) % partitions;
}

// ---------------------------------------------------------------- checks

let passed = 0;
const failures = [];

function check(ok, msg) {
  if (ok) passed++;
  else {
    failures.push(msg);
    console.error(`FAILED: ${msg}`);
  }
  return ok;
}

const show = (b) => (b == null ? 'absent' : JSON.stringify(b.toString('latin1')));
const sameOpt = (a, b) => (a == null) === (b == null) && (a == null || Buffer.compare(a, b) === 0);

/** How got differs from want ('' when equal): offsets, timestamps, keys, values, headers. */
function sameRecords(got, want) {
  if (got.length !== want.length) return `${got.length} records, want ${want.length}`;
  for (let i = 0; i < got.length; i++) {
    const g = got[i];
    const w = want[i];
    if (g.offset !== w.offset) return `record ${i}: offset ${g.offset}, want ${w.offset}`;
    if (g.timestampMs !== w.timestampMs) return `offset ${g.offset}: timestamp ${g.timestampMs}, want ${w.timestampMs}`;
    if (!sameOpt(g.key, w.key)) return `offset ${g.offset}: key ${show(g.key)}, want ${show(w.key)}`;
    if (!sameOpt(g.value, w.value)) return `offset ${g.offset}: value ${show(g.value)}, want ${show(w.value)}`;
    if (g.headers.length !== w.headers.length) return `offset ${g.offset}: ${g.headers.length} headers, want ${w.headers.length}`;
    for (let j = 0; j < g.headers.length; j++) {
      const gh = g.headers[j];
      const wh = w.headers[j];
      if (gh.key !== wh.key || !sameOpt(gh.value, wh.value)) {
        return `offset ${g.offset}: header ${j} is ${gh.key}=${show(gh.value)}, want ${wh.key}=${show(wh.value)}`;
      }
    }
  }
  return '';
}

const unhex = (s) => Buffer.from(s, 'hex');
const unhexOpt = (s) => (s == null ? null : unhex(s));

let goldenDecoded = 0;
let goldenRebuilt = 0;

function checkGolden(g) {
  check(crc32c(unhex(g.crc32c_check.input)) === g.crc32c_check.crc, 'golden: crc32c of the check input');
  for (const gb of g.batches) {
    const name = `golden batch ${gb.name}`;
    let b;
    try {
      b = parseBatch(unhex(gb.batch));
    } catch (e) {
      check(false, `${name}: parses as a RecordBatch: ${e.message}`);
      continue;
    }
    const records = unhex(gb.records);
    const header = unhex(gb.crc_header);
    check(COMPRESSION_NAMES[b.compression] === gb.compression, `${name}: compression ${b.compression}`);
    check(b.crc === gb.crc, `${name}: crc field ${b.crc}, golden ${gb.crc}`);
    check(records.equals(b.records), `${name}: records field`);
    check(b.firstTimestampMs === gb.first_timestamp_ms && b.maxTimestampMs === gb.max_timestamp_ms &&
      b.lastOffsetDelta === gb.last_offset_delta && b.recordCount === gb.record_count &&
      b.producerId === gb.producer_id && b.producerEpoch === gb.producer_epoch &&
      b.baseSequence === gb.base_sequence, `${name}: header fields`);
    check(crcHeader(b).equals(header), `${name}: 44-byte CRC header`);
    check(crc32c(header, records) === gb.crc, `${name}: CRC32C over header and records`);
    check(crc32c(crcHeader(b), b.records) === gb.crc, `${name}: CRC computed from the parsed batch`);
    const want = gb.decoded.map((r) => ({
      offset: r.offset_delta,
      timestampMs: gb.first_timestamp_ms + r.timestamp_delta_ms,
      key: unhexOpt(r.key),
      value: unhexOpt(r.value),
      headers: r.headers.map((h) => ({ key: h.key, value: unhexOpt(h.value) })),
    }));
    const raw = decompress(b.compression, b.records);
    if (raw === null) continue; // zstd: CRC and header checked above; the node decodes it (decode: true)
    check(raw.equals(unhex(gb.records_uncompressed)), `${name}: decompressed records`);
    // Compressors differ in their bytes: what must hold is that this one's output inflates back.
    if (b.compression === COMPRESSION.NONE || b.compression === COMPRESSION.GZIP) check(decompress(b.compression, compress(b.compression, raw)).equals(raw), `${name}: this codec's compression inflates back`);
    const diff = sameRecords(decodeBatch(b), want);
    check(diff === '', `${name}: decoded records: ${diff}`);
    goldenDecoded++;
    if (b.compression === COMPRESSION.NONE) {
      const built = buildBatch(want, COMPRESSION.NONE, gb.producer_id, gb.producer_epoch, gb.base_sequence);
      check(built.bytes.equals(unhex(gb.batch)), `${name}: the builder reproduces the batch byte for byte (built ${built.bytes.toString('hex')})`);
      goldenRebuilt++;
    }
  }
  for (const k of g.partitioner) {
    const key = unhex(k.key);
    check(murmur2(key) === k.murmur2, `golden partitioner: murmur2(${k.key}) = ${murmur2(key)}, golden ${k.murmur2}`);
    for (const [n, p] of Object.entries(k.partitions)) {
      check(partitionForKey(key, Number(n)) === p, `golden partitioner: key ${k.key} over ${n} partitions: ${partitionForKey(key, Number(n))}, golden ${p}`);
    }
  }
}

// ---------------------------------------------------------------- the cluster

function loadService(protoDir) {
  const def = protoLoader.loadSync('headwater/v1/client.proto', {
    includeDirs: [protoDir],
    keepCase: false,
    longs: Number,
    enums: String,
    bytes: Buffer,
    defaults: true, // proto3 optional fields stay absent (undefined) when not sent
    oneofs: false,
  });
  return { def, Service: grpc.loadPackageDefinition(def).headwater.v1.HeadwaterService };
}

class Cluster {
  constructor(svc, bootstrap, topic) {
    this.svc = svc;
    this.bootstrap = bootstrap;
    this.topic = topic;
    this.clients = new Map();
    this.partitions = 0;
    this.leaders = new Map();
  }

  client(addr) {
    if (!this.clients.has(addr)) this.clients.set(addr, new this.svc.Service(addr, grpc.credentials.createInsecure()));
    return this.clients.get(addr);
  }

  call(addr, method, request) {
    return new Promise((resolve, reject) => {
      this.client(addr)[method](request, { deadline: Date.now() + CALL_TIMEOUT_MS }, (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  }

  /** Produce with the request serialized here around batch bytes built here, sent as they are. */
  produceRaw(addr, partition, batchBytes) {
    const def = this.svc.def['headwater.v1.HeadwaterService'].Produce;
    // ProduceRequest{acks: -1, topics: [ProduceTopicData{topic, partitions: [ProducePartitionData{
    // partition, batches: [the batch]}]}]}: an embedded message is its bytes, length-prefixed.
    const partitionData = new Writer().int(1, partition).bytes(2, batchBytes, true).finish();
    const topicData = new Writer().string(1, this.topic).bytes(2, partitionData, true).finish();
    const request = new Writer().int(1, -1).bytes(3, topicData, true).finish();
    return new Promise((resolve, reject) => {
      this.client(addr).makeUnaryRequest(def.path, (buf) => buf, def.responseDeserialize, request,
        { deadline: Date.now() + CALL_TIMEOUT_MS }, (err, resp) => (err ? reject(err) : resolve(resp)));
    });
  }

  /** Asks the bootstrap node for the topic's partitions until each has a leader. */
  async refreshLeaders() {
    const deadline = Date.now() + CALL_TIMEOUT_MS;
    for (;;) {
      const md = await this.call(this.bootstrap, 'Metadata', { topics: [this.topic] });
      const nodes = new Map(md.nodes.map((n) => [n.nodeId, `${n.host}:${n.port}`]));
      this.leaders.clear();
      for (const t of md.topics) {
        if (t.name !== this.topic || t.errorCode !== 'ERROR_CODE_NONE') continue;
        this.partitions = t.partitions.length;
        for (const p of t.partitions) if (p.leaderId >= 0 && nodes.has(p.leaderId)) this.leaders.set(p.partition, nodes.get(p.leaderId));
      }
      if (this.partitions > 0 && this.leaders.size === this.partitions) return;
      if (Date.now() > deadline) throw new Error(`topic ${this.topic}: ${this.leaders.size} of ${this.partitions} partitions have a leader`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

const written = new Map(); // partition -> Map(offset -> record)

function add(partition, r) {
  if (!written.has(partition)) written.set(partition, new Map());
  written.get(partition).set(r.offset, r);
}

function want(partition) {
  return [...(written.get(partition) || new Map()).values()].sort((a, b) => a.offset - b.offset);
}

const utf8 = (s) => Buffer.from(s, 'utf8');

/**
 * Plain records through the bootstrap node: the golden partitioner keys, keyed records with headers,
 * an empty key and a tombstone. Each answered partition must be the example's own murmur2 partition
 * (and the golden one for the golden keys).
 */
async function publish(cl, g) {
  const recs = [];
  const goldenPartition = new Map();
  g.partitioner.forEach((k, i) => {
    const p = k.partitions[String(cl.partitions)];
    if (p !== undefined) goldenPartition.set(recs.length, p);
    recs.push({ key: unhex(k.key), value: utf8(`golden-key-${i}`), headers: [] });
  });
  for (let i = 0; i < 24; i++) {
    const r = { key: utf8(`node-key-${i % 8}`), value: utf8(`node-publish-${i}`), headers: [] };
    if (i % 3 === 0) r.headers = [{ key: 'lang', value: utf8('node') }, { key: 'absent', value: null }, { key: 'empty', value: Buffer.alloc(0) }];
    if (i === 20) r.value = null; // a tombstone
    recs.push(r);
  }
  const request = {
    topic: cl.topic,
    records: recs.map((r) => {
      const pr = { headers: r.headers.map((h) => (h.value === null ? { key: h.key } : h)) };
      if (r.key !== null) pr.key = r.key;
      if (r.value !== null) pr.value = r.value;
      return pr;
    }),
  };
  let resp;
  try {
    resp = await cl.call(cl.bootstrap, 'Publish', request);
  } catch (e) {
    check(false, `Publish via ${cl.bootstrap}: ${e.message}`);
    return 0;
  }
  if (!check(resp.results.length === recs.length, `Publish: ${resp.results.length} results for ${recs.length} records`)) return 0;
  const lastOffset = new Map();
  resp.results.forEach((res, i) => {
    const r = recs[i];
    if (!check(res.errorCode === 'ERROR_CODE_NONE', `Publish record ${i}: ${res.errorCode} ${res.errorMessage}`)) return;
    const p = partitionForKey(r.key, cl.partitions);
    check(res.partition === p, `Publish: key ${r.key.toString('hex')} went to partition ${res.partition}, murmur2 says ${p}`);
    if (goldenPartition.has(i)) {
      check(res.partition === goldenPartition.get(i), `Publish: golden key ${r.key.toString('hex')} went to partition ${res.partition}, golden ${goldenPartition.get(i)}`);
    }
    if (lastOffset.has(res.partition)) check(res.offset > lastOffset.get(res.partition), `Publish: offsets of partition ${res.partition} keep the request's order`);
    lastOffset.set(res.partition, res.offset);
    add(res.partition, { ...r, offset: res.offset, timestampMs: res.timestampMs });
  });
  return recs.length;
}

/**
 * A few Publish requests on one PublishStream, all sent before any answer is read: the answers must
 * come in request order, each record where murmur2 says.
 */
async function publishStream(cl) {
  const sent = [];
  const answers = [];
  let failed = null;
  await new Promise((resolve) => {
    const stream = cl.client(cl.bootstrap).PublishStream({ deadline: Date.now() + CALL_TIMEOUT_MS });
    stream.on('data', (msg) => answers.push(msg.response));
    stream.on('error', (e) => {
      failed = e;
      resolve();
    });
    stream.on('end', resolve);
    for (let req = 0; req < 3; req++) {
      const recs = [];
      for (let i = 0; i < 4; i++) {
        recs.push({ key: utf8(`node-stream-${req}-${i}`), value: utf8(`node-stream-value-${req}-${i}`), headers: [{ key: 'request', value: utf8(String(req)) }] });
      }
      sent.push(recs);
      stream.write({ request: { topic: cl.topic, records: recs } });
    }
    stream.end();
  });
  if (!check(failed === null, `PublishStream via ${cl.bootstrap}: ${failed && failed.message}`)) return 0;
  if (!check(answers.length === sent.length, `PublishStream: ${answers.length} answers for ${sent.length} requests`)) return 0;
  let total = 0;
  sent.forEach((recs, req) => {
    const results = answers[req].results;
    if (!check(results.length === recs.length, `PublishStream: answer ${req} has ${results.length} results for ${recs.length} records (answers in request order)`)) return;
    results.forEach((res, i) => {
      const r = recs[i];
      if (!check(res.errorCode === 'ERROR_CODE_NONE', `PublishStream request ${req} record ${i}: ${res.errorCode} ${res.errorMessage}`)) return;
      const p = partitionForKey(r.key, cl.partitions);
      check(res.partition === p, `PublishStream: key ${r.key} went to partition ${res.partition}, murmur2 says ${p}`);
      add(res.partition, { ...r, offset: res.offset, timestampMs: res.timestampMs });
      total++;
    });
  });
  return total;
}

const RETRIABLE = new Set(['ERROR_CODE_NOT_LEADER_OR_FOLLOWER', 'ERROR_CODE_LEADER_NOT_AVAILABLE',
  'ERROR_CODE_NOT_ENOUGH_REPLICAS', 'ERROR_CODE_REQUEST_TIMED_OUT', 'ERROR_CODE_FENCED_LEADER_EPOCH']);

/** One batch per partition (keys spread by murmur2; none or gzip), sent to each leader with Produce. */
async function produceNative(cl) {
  const byPartition = new Map();
  const now = Date.now();
  for (let i = 0; i < 36; i++) {
    const key = utf8(`node-native-${i}`);
    const r = { key, value: utf8(`node-native-value-${i}`), timestampMs: now + (i % 5) - 2, // not monotonic
      headers: [{ key: 'batch', value: utf8('native') }, { key: 'i', value: utf8(String(i)) }] };
    if (i % 7 === 0) {
      r.value = null;
      r.headers.push({ key: 'none', value: null });
    }
    const p = partitionForKey(key, cl.partitions);
    if (!byPartition.has(p)) byPartition.set(p, []);
    byPartition.get(p).push(r);
  }
  let total = 0;
  for (const [p, recs] of byPartition) {
    const codec = p % 2 === 0 ? COMPRESSION.NONE : COMPRESSION.GZIP;
    const { bytes } = buildBatch(recs, codec);
    let last = '';
    let base = null;
    for (let attempt = 0; attempt < 10 && base === null; attempt++) {
      try {
        const pr = (await cl.produceRaw(cl.leaders.get(p), p, bytes)).topics[0].partitions[0];
        if (pr.errorCode === 'ERROR_CODE_NONE') base = pr.baseOffset;
        else {
          last = `${pr.errorCode} ${pr.errorMessage}`;
          if (!RETRIABLE.has(pr.errorCode)) break;
        }
      } catch (e) {
        last = e.message;
      }
      if (base === null) {
        await new Promise((r) => setTimeout(r, 100 * (attempt + 1)));
        await cl.refreshLeaders();
      }
    }
    if (!check(base !== null, `Produce ${cl.topic}/${p} (${COMPRESSION_NAMES[codec]} batch) to its leader: ${last}`)) continue;
    recs.forEach((r, i) => add(p, { ...r, offset: base + i }));
    total += recs.length;
  }
  return total;
}

const fromConsumerRecord = (r) => ({
  offset: r.offset,
  timestampMs: r.timestampMs,
  key: r.key === undefined ? null : r.key,
  value: r.value === undefined ? null : r.value,
  headers: r.headers.map((h) => ({ key: h.key, value: h.value === undefined ? null : h.value })),
});

/** Each partition streamed from the earliest offset with decode, from the bootstrap node. */
async function readSubscribe(cl) {
  for (let p = 0; p < cl.partitions; p++) {
    const w = want(p);
    const got = [];
    if (w.length > 0) {
      const lastOffset = w[w.length - 1].offset;
      await new Promise((resolve) => {
        const stream = cl.client(cl.bootstrap).Subscribe({ topic: cl.topic, partition: p, offset: -2, decode: true },
          { deadline: Date.now() + CALL_TIMEOUT_MS });
        let done = false;
        const finish = () => {
          if (!done) {
            done = true;
            stream.cancel();
            resolve();
          }
        };
        stream.on('data', (msg) => {
          if (done) return;
          if (!check(msg.errorCode === 'ERROR_CODE_NONE', `Subscribe ${cl.topic}/${p}: ${msg.errorCode} ${msg.errorMessage}`)) return finish();
          for (const r of msg.records) {
            got.push(fromConsumerRecord(r));
            if (r.offset >= lastOffset) return finish();
          }
        });
        stream.on('error', (e) => {
          if (!done) check(false, `Subscribe ${cl.topic}/${p}: ${e.message}`);
          finish();
        });
        stream.on('end', finish);
      });
    }
    const diff = sameRecords(got, w);
    check(diff === '', `Subscribe ${cl.topic}/${p}: ${diff}`);
  }
}

/**
 * Every partition from offset 0 with Fetch: decoded by the node (asked of the bootstrap node,
 * whatever it leads), or raw batches from each leader, CRC-checked and decoded here.
 */
async function readFetch(cl, decode) {
  const how = decode ? 'decoded' : 'raw';
  const got = new Map();
  const next = new Map();
  const deadline = Date.now() + CALL_TIMEOUT_MS;
  outer: while (Date.now() < deadline) {
    const pending = new Map();
    for (let p = 0; p < cl.partitions; p++) {
      const w = want(p);
      const n = next.get(p) || 0;
      if (w.length === 0 || n > w[w.length - 1].offset) continue;
      const addr = decode ? cl.bootstrap : cl.leaders.get(p);
      if (!pending.has(addr)) pending.set(addr, []);
      pending.get(addr).push({ partition: p, fetchOffset: n, lastFetchedEpoch: -1, logStartOffset: -1 });
    }
    if (pending.size === 0) break;
    for (const [addr, partitions] of pending) {
      let resp;
      try {
        resp = await cl.call(addr, 'Fetch', { maxWaitMs: 500, decode, topics: [{ topic: cl.topic, partitions }] });
      } catch (e) {
        check(false, `Fetch ${how} from ${addr}: ${e.message}`);
        break outer;
      }
      for (const t of resp.topics) {
        for (const pr of t.partitions) {
          const p = pr.partition;
          if (!decode && pr.errorCode === 'ERROR_CODE_NOT_LEADER_OR_FOLLOWER') {
            await cl.refreshLeaders();
            continue;
          }
          if (!check(pr.errorCode === 'ERROR_CODE_NONE', `Fetch ${how} ${cl.topic}/${p}: ${pr.errorCode} ${pr.errorMessage}`)) break outer;
          const recs = pr.records.map(fromConsumerRecord);
          for (const sb of pr.batches) {
            const b = { ...sb, compression: compressionNumber(sb.compression), timestampType: sb.timestampType === 'TIMESTAMP_TYPE_LOG_APPEND_TIME' ? 1 : 0 };
            check(crc32c(crcHeader(b), b.records) === b.crc, `Fetch raw ${cl.topic}/${p}: batch at ${b.baseOffset} has a valid CRC`);
            try {
              recs.push(...decodeBatch(b));
            } catch (e) {
              check(false, `Fetch raw ${cl.topic}/${p}: batch at ${b.baseOffset} (${sb.compression}) decodes: ${e.message}`);
              break outer;
            }
          }
          for (const r of recs) {
            if (r.offset >= (next.get(p) || 0)) { // a batch may start before the fetch offset
              if (!got.has(p)) got.set(p, []);
              got.get(p).push(r);
              next.set(p, r.offset + 1);
            }
          }
        }
      }
    }
  }
  for (let p = 0; p < cl.partitions; p++) {
    const diff = sameRecords(got.get(p) || [], want(p));
    check(diff === '', `Fetch ${how} ${cl.topic}/${p}: ${diff}`);
  }
}

async function main() {
  const args = process.argv.slice(2);
  const opts = { topic: '', partitions: 6, golden: path.join(__dirname, '../../proto/testdata/golden.json'), proto: path.join(__dirname, '../../proto') };
  const rest = [];
  const usage = 'usage: node example.js [--topic NAME] [--partitions N] [--golden PATH] [--proto DIR] BOOTSTRAP';
  if (args.includes('--help') || args.includes('-h')) {
    console.log(usage);
    return;
  }
  for (let i = 0; i < args.length; i++) {
    if (args[i].startsWith('--') && args[i].slice(2) in opts) opts[args[i].slice(2)] = args[++i];
    else rest.push(args[i]);
  }
  if (rest.length !== 1) {
    console.error(usage);
    process.exit(2);
  }
  const bootstrap = rest[0].split(',')[0];
  const topic = opts.topic || `example-node-${crypto.randomBytes(4).toString('hex')}`;
  const started = Date.now();
  const g = JSON.parse(fs.readFileSync(opts.golden, 'utf8'));
  checkGolden(g);
  const goldenChecks = passed;

  const cl = new Cluster(loadService(opts.proto), bootstrap, topic);
  try {
    const created = await cl.call(bootstrap, 'CreateTopics', { topics: [{ name: topic, numPartitions: Number(opts.partitions) }] });
    for (const t of created.topics) {
      if (t.errorCode !== 'ERROR_CODE_NONE') throw new Error(`CreateTopics ${topic}: ${t.errorCode} ${t.errorMessage} (the example needs a new topic)`);
    }
    await cl.refreshLeaders();
    const published = (await publish(cl, g)) + (await publishStream(cl));
    const nativeCount = await produceNative(cl);
    await readSubscribe(cl);
    await readFetch(cl, true);
    await readFetch(cl, false);
    const count = [...written.values()].reduce((n, m) => n + m.size, 0);
    console.log(`node example: topic ${topic} (${cl.partitions} partitions) via ${bootstrap}`);
    console.log(`  golden vectors: ${g.batches.length} batches (${goldenDecoded} decoded here, ${goldenRebuilt} rebuilt byte for byte), ${g.partitioner.length} partitioner keys, ${goldenChecks} checks`);
    console.log(`  wrote ${count} records (${published} with Publish and PublishStream, ${nativeCount} in native batches); read back with Subscribe, Fetch decoded, Fetch raw`);
  } finally {
    for (const c of cl.clients.values()) c.close();
  }
  if (failures.length > 0) {
    console.log(`FAILED: ${failures.length} of ${failures.length + passed} checks failed (first: ${failures[0]})`);
    process.exit(1);
  }
  console.log(`OK: ${passed} checks passed in ${((Date.now() - started) / 1000).toFixed(1)} s`);
}

if (require.main === module) {
  main().catch((e) => {
    console.error(`headwater-example-node: ${e.message}`);
    process.exit(2);
  });
}

module.exports = { buildBatch, decodeBatch, crc32c, crcHeader, compress, decompress, murmur2, partitionForKey };
