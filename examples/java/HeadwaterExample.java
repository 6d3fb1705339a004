import com.google.protobuf.ByteString;
import com.google.protobuf.InvalidProtocolBufferException;
import headwater.v1.Client.CreatableTopic;
import headwater.v1.Client.CreateTopicsRequest;
import headwater.v1.Client.CreateTopicsResponse;
import headwater.v1.Client.CreatableTopicResult;
import headwater.v1.Client.FetchPartition;
import headwater.v1.Client.FetchPartitionResponse;
import headwater.v1.Client.FetchRequest;
import headwater.v1.Client.FetchResponse;
import headwater.v1.Client.FetchTopic;
import headwater.v1.Client.FetchTopicResponse;
import headwater.v1.Client.MetadataRequest;
import headwater.v1.Client.MetadataResponse;
import headwater.v1.Client.NodeInfo;
import headwater.v1.Client.PartitionMetadata;
import headwater.v1.Client.ProducePartitionData;
import headwater.v1.Client.ProducePartitionResponse;
import headwater.v1.Client.ProduceRequest;
import headwater.v1.Client.ProduceResponse;
import headwater.v1.Client.ProduceTopicData;
import headwater.v1.Client.PublishRecord;
import headwater.v1.Client.PublishRequest;
import headwater.v1.Client.PublishResponse;
import headwater.v1.Client.PublishResult;
import headwater.v1.Client.SubscribeRequest;
import headwater.v1.Client.SubscribeResponse;
import headwater.v1.Client.TopicMetadata;
import headwater.v1.Errors.ErrorCode;
import headwater.v1.HeadwaterServiceGrpc;
import headwater.v1.HeadwaterServiceGrpc.HeadwaterServiceBlockingStub;
import headwater.v1.RecordsOuterClass.CompressionType;
import headwater.v1.RecordsOuterClass.ConsumerRecord;
import headwater.v1.RecordsOuterClass.Record;
import headwater.v1.RecordsOuterClass.RecordBatch;
import headwater.v1.RecordsOuterClass.RecordHeader;
import headwater.v1.RecordsOuterClass.Records;
import headwater.v1.RecordsOuterClass.TimestampType;
import headwater.v1.Client.PublishStreamRequest;
import headwater.v1.Client.PublishStreamResponse;
import io.grpc.Context;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.StreamObserver;
import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.HashMap;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicReference;
import java.util.zip.CRC32C;
import java.util.zip.GZIPInputStream;
import java.util.zip.GZIPOutputStream;

/**
 * A Headwater client in Java, from the gRPC contract alone (proto/headwater/v1).
 *
 * <p>Creates a topic, produces keyed records the simple way (Publish, through any node) and the
 * native way (RecordBatch bytes built here, sent to each partition's leader with Produce), reads
 * them back with Subscribe and Fetch, and checks every record, the partitioner and the batch codec
 * against the golden vectors. Exits 0 only when every check passed.
 *
 * <pre>java HeadwaterExample [--topic NAME] [--partitions N] [--golden golden.json] BOOTSTRAP</pre>
 */
public final class HeadwaterExample {
  static final long CALL_TIMEOUT_S = 30;

  // ------------------------------------------------------------------ records and checks

  /** One record header; a null value is absent (not empty). */
  record Header(String key, byte[] value) {}

  /** One record as written and read; a null key or value is absent (a null value: a tombstone). */
  static final class Rec {
    long offset;
    long timestampMs;
    byte[] key;
    byte[] value;
    List<Header> headers = new ArrayList<>();

    Rec(byte[] key, byte[] value) {
      this.key = key;
      this.value = value;
    }
  }

  int passed;
  final List<String> failures = new ArrayList<>();

  boolean check(boolean ok, String format, Object... args) {
    if (ok) {
      passed++;
    } else {
      String msg = String.format(format, args);
      failures.add(msg);
      System.err.println("FAILED: " + msg);
    }
    return ok;
  }

  static String show(byte[] b) {
    if (b == null) {
      return "absent";
    }
    StringBuilder sb = new StringBuilder("\"");
    for (byte x : b) {
      sb.append(x >= 0x20 && x < 0x7f && x != '"' && x != '\\' ? String.valueOf((char) x) : String.format("\\x%02x", x & 0xff));
    }
    return sb.append('"').toString();
  }

  /** How got differs from want ("" when equal): offsets, timestamps, keys, values, headers. */
  static String sameRecords(List<Rec> got, List<Rec> want) {
    if (got.size() != want.size()) {
      return got.size() + " records, want " + want.size();
    }
    for (int i = 0; i < got.size(); i++) {
      Rec g = got.get(i);
      Rec w = want.get(i);
      if (g.offset != w.offset) {
        return "record " + i + ": offset " + g.offset + ", want " + w.offset;
      }
      if (g.timestampMs != w.timestampMs) {
        return "offset " + g.offset + ": timestamp " + g.timestampMs + ", want " + w.timestampMs;
      }
      if (!Arrays.equals(g.key, w.key)) {
        return "offset " + g.offset + ": key " + show(g.key) + ", want " + show(w.key);
      }
      if (!Arrays.equals(g.value, w.value)) {
        return "offset " + g.offset + ": value " + show(g.value) + ", want " + show(w.value);
      }
      if (g.headers.size() != w.headers.size()) {
        return "offset " + g.offset + ": " + g.headers.size() + " headers, want " + w.headers.size();
      }
      for (int j = 0; j < g.headers.size(); j++) {
        Header gh = g.headers.get(j);
        Header wh = w.headers.get(j);
        if (!gh.key().equals(wh.key()) || !Arrays.equals(gh.value(), wh.value())) {
          return "offset " + g.offset + ": header " + j + " is " + gh.key() + "=" + show(gh.value())
              + ", want " + wh.key() + "=" + show(wh.value());
        }
      }
    }
    return "";
  }

  // ------------------------------------------------------------------ the batch format (records.proto)

  /** CRC32C (Castagnoli) of the pieces, one after another. */
  static long crc32c(byte[]... pieces) {
    CRC32C crc = new CRC32C();
    for (byte[] p : pieces) {
      crc.update(p);
    }
    return crc.getValue();
  }

  /** The 44 big-endian bytes the CRC covers before the records bytes. */
  static byte[] crcHeader(RecordBatch b) {
    return ByteBuffer.allocate(44)
        .putInt(b.getLastOffsetDelta())
        .putLong(b.getFirstTimestampMs())
        .putLong(b.getMaxTimestampMs())
        .putLong(b.getProducerId())
        .putInt(b.getProducerEpoch())
        .putInt(b.getBaseSequence())
        .putInt(b.getCompressionValue())
        .putInt(b.getRecordCount())
        .array();
  }

  static long batchCrc(RecordBatch b) {
    return crc32c(crcHeader(b), b.getRecords().toByteArray());
  }

  static byte[] compress(CompressionType c, byte[] data) {
    switch (c) {
      case COMPRESSION_TYPE_NONE:
        return data;
      case COMPRESSION_TYPE_GZIP:
        try {
          ByteArrayOutputStream out = new ByteArrayOutputStream();
          try (GZIPOutputStream gz = new GZIPOutputStream(out)) {
            gz.write(data);
          }
          return out.toByteArray();
        } catch (IOException e) {
          throw new UncheckedIOException(e);
        }
      default:
        throw new IllegalArgumentException("this example does not compress with " + c);
    }
  }

  /**
   * An LZ4 frame (the format's magic 04 22 4d 18, then blocks) inflated: the LZ4 frame and block
   * formats are short enough to read without a library. Checksums are not verified.
   */
  static byte[] lz4FrameDecompress(byte[] data) throws IOException {
    ByteBuffer in = ByteBuffer.wrap(data).order(ByteOrder.LITTLE_ENDIAN);
    if (in.getInt(0) != 0x184d2204) {
      throw new IOException("not an LZ4 frame");
    }
    int flg = data[4] & 0xff;
    int pos = 6 + ((flg & 0x08) != 0 ? 8 : 0) + ((flg & 0x01) != 0 ? 4 : 0) + 1; // FLG, BD, size, dict id, HC
    byte[] out = new byte[64];
    int n = 0;
    while (true) {
      int size = in.getInt(pos);
      pos += 4;
      if (size == 0) {
        break; // end mark
      }
      int end = pos + (size & 0x7fffffff);
      int i = pos;
      while (i < end) {
        int lit;
        int token = -1;
        if (size < 0) { // stored uncompressed
          lit = end - i;
        } else {
          token = data[i++] & 0xff;
          lit = token >>> 4;
          if (lit == 15) {
            for (int b = 255; b == 255; lit += b) {
              b = data[i++] & 0xff;
            }
          }
        }
        if (n + lit > out.length) {
          out = Arrays.copyOf(out, Math.max(2 * out.length, n + lit));
        }
        System.arraycopy(data, i, out, n, lit);
        i += lit;
        n += lit;
        if (i >= end) {
          break; // the last sequence has literals only
        }
        int offset = (data[i] & 0xff) | ((data[i + 1] & 0xff) << 8);
        i += 2;
        int match = token & 15;
        if (match == 15) {
          for (int b = 255; b == 255; match += b) {
            b = data[i++] & 0xff;
          }
        }
        match += 4;
        if (n + match > out.length) {
          out = Arrays.copyOf(out, Math.max(2 * out.length, n + match));
        }
        for (int k = 0; k < match; k++, n++) {
          out[n] = out[n - offset]; // may overlap
        }
      }
      pos = end + ((flg & 0x10) != 0 ? 4 : 0); // block checksum
    }
    return Arrays.copyOf(out, n);
  }

  /** Inflates a records payload; null for zstd, which this example leaves to the node (decode: true). */
  static byte[] decompress(CompressionType c, byte[] data) throws IOException {
    switch (c) {
      case COMPRESSION_TYPE_NONE:
        return data;
      case COMPRESSION_TYPE_GZIP:
        try (GZIPInputStream gz = new GZIPInputStream(new ByteArrayInputStream(data))) {
          return gz.readAllBytes();
        }
      case COMPRESSION_TYPE_LZ4:
        return lz4FrameDecompress(data);
      default:
        return null;
    }
  }

  static ByteString bytes(byte[] b) {
    return ByteString.copyFrom(b);
  }

  /**
   * A producer's batch (base_offset 0): offset deltas 0..n-1, timestamps as deltas from the first
   * record's, max_timestamp_ms the largest, the CRC over the 44-byte header and the records bytes.
   */
  static RecordBatch buildBatch(
      List<Rec> recs, CompressionType compression, long producerId, int producerEpoch, int baseSequence) {
    long first = recs.get(0).timestampMs;
    long max = first;
    Records.Builder payload = Records.newBuilder();
    for (int i = 0; i < recs.size(); i++) {
      Rec r = recs.get(i);
      max = Math.max(max, r.timestampMs);
      Record.Builder rb = Record.newBuilder().setOffsetDelta(i).setTimestampDeltaMs(r.timestampMs - first);
      if (r.key != null) {
        rb.setKey(bytes(r.key));
      }
      if (r.value != null) {
        rb.setValue(bytes(r.value));
      }
      for (Header h : r.headers) {
        RecordHeader.Builder hb = RecordHeader.newBuilder().setKey(h.key());
        if (h.value() != null) {
          hb.setValue(bytes(h.value()));
        }
        rb.addHeaders(hb);
      }
      payload.addRecords(rb);
    }
    RecordBatch header = RecordBatch.newBuilder()
        .setLastOffsetDelta(recs.size() - 1)
        .setFirstTimestampMs(first)
        .setMaxTimestampMs(max)
        .setProducerId(producerId)
        .setProducerEpoch(producerEpoch)
        .setBaseSequence(baseSequence)
        .setCompression(compression)
        .setRecordCount(recs.size())
        .setRecords(bytes(compress(compression, payload.build().toByteArray())))
        .build();
    return header.toBuilder().setCrc((int) batchCrc(header)).build();
  }

  /** A stored batch's records with absolute offsets and timestamps (LogAppendTime: max_timestamp_ms). */
  static List<Rec> decodeBatch(RecordBatch b) throws IOException {
    byte[] raw = decompress(b.getCompression(), b.getRecords().toByteArray());
    if (raw == null) {
      throw new IOException("cannot inflate " + b.getCompression() + " here");
    }
    boolean appendTime = b.getTimestampType() == TimestampType.TIMESTAMP_TYPE_LOG_APPEND_TIME;
    List<Rec> out = new ArrayList<>();
    for (Record r : Records.parseFrom(raw).getRecordsList()) {
      Rec rec = new Rec(r.hasKey() ? r.getKey().toByteArray() : null, r.hasValue() ? r.getValue().toByteArray() : null);
      rec.offset = b.getBaseOffset() + r.getOffsetDelta();
      rec.timestampMs = appendTime ? b.getMaxTimestampMs() : b.getFirstTimestampMs() + r.getTimestampDeltaMs();
      for (RecordHeader h : r.getHeadersList()) {
        rec.headers.add(new Header(h.getKey(), h.hasValue() ? h.getValue().toByteArray() : null));
      }
      out.add(rec);
    }
    return out;
  }

  /** Kafka's Utils.murmur2: 32-bit MurmurHash2 with seed 0x9747b28c (int arithmetic wraps as it must). */
  static int murmur2(byte[] data) {
    final int m = 0x5bd1e995;
    int length = data.length;
    int h = 0x9747b28c ^ length;
    int n4 = length & ~3;
    for (int i = 0; i < n4; i += 4) {
      int k = (data[i] & 0xff) | ((data[i + 1] & 0xff) << 8) | ((data[i + 2] & 0xff) << 16) | ((data[i + 3] & 0xff) << 24);
      k *= m;
      k ^= k >>> 24;
      k *= m;
      h *= m;
      h ^= k;
    }
    switch (length & 3) {
      case 3:
        h ^= (data[n4 + 2] & 0xff) << 16;
      // fall through
      case 2:
        h ^= (data[n4 + 1] & 0xff) << 8;
      // fall through
      case 1:
        h ^= data[n4] & 0xff;
        h *= m;
      default:
    }
    h ^= h >>> 13;
    h *= m;
    h ^= h >>> 15;
    return h;
  }

  static int partitionForKey(byte[] key, int partitions) {
    return (murmur2(key) & 0x7fffffff) % partitions;
  }

  // ------------------------------------------------------------------ golden vectors

  static byte[] unhex(String s) {
    byte[] out = new byte[s.length() / 2];
    for (int i = 0; i < out.length; i++) {
      out[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
    }
    return out;
  }

  static byte[] unhexOpt(Object s) {
    return s == null ? null : unhex((String) s);
  }

  static String hex(byte[] b) {
    StringBuilder sb = new StringBuilder();
    for (byte x : b) {
      sb.append(String.format("%02x", x));
    }
    return sb.toString();
  }

  @SuppressWarnings("unchecked")
  static Map<String, Object> obj(Object o) {
    return (Map<String, Object>) o;
  }

  @SuppressWarnings("unchecked")
  static List<Object> list(Object o) {
    return (List<Object>) o;
  }

  static long num(Map<String, Object> m, String k) {
    return (Long) m.get(k);
  }

  int goldenBatches;
  int goldenDecoded;
  int goldenRebuilt;
  int goldenKeys;

  void checkGolden(Map<String, Object> g) throws IOException {
    Map<String, Object> crcCheck = obj(g.get("crc32c_check"));
    check(crc32c(unhex((String) crcCheck.get("input"))) == num(crcCheck, "crc"), "golden: crc32c of the check input");
    for (Object o : list(g.get("batches"))) {
      Map<String, Object> gb = obj(o);
      goldenBatches++;
      String name = "golden batch " + gb.get("name");
      RecordBatch b;
      try {
        b = RecordBatch.parseFrom(unhex((String) gb.get("batch")));
      } catch (InvalidProtocolBufferException e) {
        check(false, "%s: parses as a RecordBatch: %s", name, e);
        continue;
      }
      long crc = num(gb, "crc");
      byte[] records = unhex((String) gb.get("records"));
      byte[] header = unhex((String) gb.get("crc_header"));
      check(b.getCompression().name().equals(gb.get("compression")), "%s: compression %s", name, b.getCompression());
      check(Integer.toUnsignedLong(b.getCrc()) == crc, "%s: crc field", name);
      check(Arrays.equals(b.getRecords().toByteArray(), records), "%s: records field", name);
      check(b.getFirstTimestampMs() == num(gb, "first_timestamp_ms") && b.getMaxTimestampMs() == num(gb, "max_timestamp_ms")
          && b.getLastOffsetDelta() == num(gb, "last_offset_delta") && b.getRecordCount() == num(gb, "record_count")
          && b.getProducerId() == num(gb, "producer_id") && b.getProducerEpoch() == num(gb, "producer_epoch")
          && b.getBaseSequence() == num(gb, "base_sequence"), "%s: header fields", name);
      check(Arrays.equals(crcHeader(b), header), "%s: 44-byte CRC header", name);
      check(crc32c(header, records) == crc, "%s: CRC32C over header and records", name);
      check(batchCrc(b) == crc, "%s: CRC computed from the parsed batch", name);
      List<Rec> want = new ArrayList<>();
      for (Object ro : list(gb.get("decoded"))) {
        Map<String, Object> r = obj(ro);
        Rec rec = new Rec(unhexOpt(r.get("key")), unhexOpt(r.get("value")));
        rec.offset = num(r, "offset_delta");
        rec.timestampMs = num(gb, "first_timestamp_ms") + num(r, "timestamp_delta_ms");
        for (Object ho : list(r.get("headers"))) {
          Map<String, Object> h = obj(ho);
          rec.headers.add(new Header((String) h.get("key"), unhexOpt(h.get("value"))));
        }
        want.add(rec);
      }
      byte[] raw = decompress(b.getCompression(), records);
      if (raw == null) {
        continue; // zstd: CRC and header checked above; the node decodes it (decode: true)
      }
      check(Arrays.equals(raw, unhex((String) gb.get("records_uncompressed"))), "%s: decompressed records", name);
      if (b.getCompression() != CompressionType.COMPRESSION_TYPE_LZ4) { // inflated here, never deflated
        // Compressors differ in their bytes: what must hold is that this one's output inflates back.
        check(Arrays.equals(decompress(b.getCompression(), compress(b.getCompression(), raw)), raw),
            "%s: this codec's compression inflates back", name);
      }
      String diff = sameRecords(decodeBatch(b), want);
      check(diff.isEmpty(), "%s: decoded records: %s", name, diff);
      goldenDecoded++;
      if (b.getCompression() == CompressionType.COMPRESSION_TYPE_NONE) {
        RecordBatch built = buildBatch(want, CompressionType.COMPRESSION_TYPE_NONE, num(gb, "producer_id"),
            (int) num(gb, "producer_epoch"), (int) num(gb, "base_sequence"));
        check(Arrays.equals(built.toByteArray(), unhex((String) gb.get("batch"))),
            "%s: the builder reproduces the batch byte for byte (built %s)", name, hex(built.toByteArray()));
        goldenRebuilt++;
      }
    }
    for (Object o : list(g.get("partitioner"))) {
      Map<String, Object> k = obj(o);
      goldenKeys++;
      byte[] key = unhex((String) k.get("key"));
      check(murmur2(key) == num(k, "murmur2"), "golden partitioner: murmur2(%s) = %d, golden %d", k.get("key"), murmur2(key), num(k, "murmur2"));
      for (Map.Entry<String, Object> e : obj(k.get("partitions")).entrySet()) {
        int n = Integer.parseInt(e.getKey());
        check(partitionForKey(key, n) == (Long) e.getValue(), "golden partitioner: key %s over %d partitions: %d, golden %d",
            k.get("key"), n, partitionForKey(key, n), e.getValue());
      }
    }
  }

  // ------------------------------------------------------------------ the cluster

  final String bootstrap;
  final String topic;
  final Map<String, ManagedChannel> channels = new HashMap<>();
  int partitions;
  final Map<Integer, String> leaders = new HashMap<>();
  /** What the example wrote, by partition and offset. */
  final Map<Integer, TreeMap<Long, Rec>> written = new TreeMap<>();

  HeadwaterExample(String bootstrap, String topic) {
    this.bootstrap = bootstrap;
    this.topic = topic;
  }

  HeadwaterServiceBlockingStub stub(String addr) {
    ManagedChannel ch = channels.computeIfAbsent(addr, a -> ManagedChannelBuilder.forTarget(a).usePlaintext().build());
    return HeadwaterServiceGrpc.newBlockingStub(ch).withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS);
  }

  void add(int partition, Rec r) {
    written.computeIfAbsent(partition, p -> new TreeMap<>()).put(r.offset, r);
  }

  List<Rec> want(int partition) {
    return new ArrayList<>(written.getOrDefault(partition, new TreeMap<>()).values());
  }

  int count() {
    return written.values().stream().mapToInt(Map::size).sum();
  }

  static void fatal(String msg) {
    System.err.println("headwater-example-java: " + msg);
    System.exit(2);
  }

  void createTopic(int numPartitions) {
    CreateTopicsResponse resp = stub(bootstrap).createTopics(CreateTopicsRequest.newBuilder()
        .addTopics(CreatableTopic.newBuilder().setName(topic).setNumPartitions(numPartitions)).build());
    for (CreatableTopicResult t : resp.getTopicsList()) {
      if (t.getErrorCode() != ErrorCode.ERROR_CODE_NONE) {
        fatal("CreateTopics " + topic + ": " + t.getErrorCode() + " " + t.getErrorMessage() + " (the example needs a new topic)");
      }
    }
  }

  /** Asks the bootstrap node for the topic's partitions until each has a leader. */
  void refreshLeaders() throws InterruptedException {
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(CALL_TIMEOUT_S);
    while (true) {
      MetadataResponse md = stub(bootstrap).metadata(MetadataRequest.newBuilder().addTopics(topic).build());
      Map<Integer, String> nodes = new HashMap<>();
      for (NodeInfo n : md.getNodesList()) {
        nodes.put(n.getNodeId(), n.getHost() + ":" + n.getPort());
      }
      leaders.clear();
      for (TopicMetadata t : md.getTopicsList()) {
        if (!t.getName().equals(topic) || t.getErrorCode() != ErrorCode.ERROR_CODE_NONE) {
          continue;
        }
        partitions = t.getPartitionsCount();
        for (PartitionMetadata p : t.getPartitionsList()) {
          if (p.getLeaderId() >= 0 && nodes.containsKey(p.getLeaderId())) {
            leaders.put(p.getPartition(), nodes.get(p.getLeaderId()));
          }
        }
      }
      if (partitions > 0 && leaders.size() == partitions) {
        return;
      }
      if (System.nanoTime() > deadline) {
        fatal("topic " + topic + ": " + leaders.size() + " of " + partitions + " partitions have a leader");
      }
      Thread.sleep(200);
    }
  }

  /**
   * Plain records through the bootstrap node: the golden partitioner keys, keyed records with
   * headers, an empty key and a tombstone. Each answered partition must be the example's own murmur2
   * partition (and the golden one for the golden keys).
   */
  int publish(Map<String, Object> g) {
    List<Rec> recs = new ArrayList<>();
    Map<Integer, Long> goldenPartition = new HashMap<>();
    for (Object o : list(g.get("partitioner"))) {
      Map<String, Object> k = obj(o);
      Object p = obj(k.get("partitions")).get(Integer.toString(partitions));
      if (p != null) {
        goldenPartition.put(recs.size(), (Long) p);
      }
      recs.add(new Rec(unhex((String) k.get("key")), ("golden-key-" + recs.size()).getBytes(StandardCharsets.UTF_8)));
    }
    for (int i = 0; i < 24; i++) {
      Rec r = new Rec(("java-key-" + (i % 8)).getBytes(StandardCharsets.UTF_8), ("java-publish-" + i).getBytes(StandardCharsets.UTF_8));
      if (i % 3 == 0) {
        r.headers.add(new Header("lang", "java".getBytes(StandardCharsets.UTF_8)));
        r.headers.add(new Header("absent", null));
        r.headers.add(new Header("empty", new byte[0]));
      }
      if (i == 20) {
        r.value = null; // a tombstone
      }
      recs.add(r);
    }
    PublishRequest.Builder req = PublishRequest.newBuilder().setTopic(topic);
    for (Rec r : recs) {
      PublishRecord.Builder pr = PublishRecord.newBuilder();
      if (r.key != null) {
        pr.setKey(bytes(r.key));
      }
      if (r.value != null) {
        pr.setValue(bytes(r.value));
      }
      for (Header h : r.headers) {
        RecordHeader.Builder hb = RecordHeader.newBuilder().setKey(h.key());
        if (h.value() != null) {
          hb.setValue(bytes(h.value()));
        }
        pr.addHeaders(hb);
      }
      req.addRecords(pr);
    }
    PublishResponse resp;
    try {
      resp = stub(bootstrap).publish(req.build());
    } catch (StatusRuntimeException e) {
      check(false, "Publish via %s: %s", bootstrap, e.getStatus());
      return 0;
    }
    if (!check(resp.getResultsCount() == recs.size(), "Publish: %d results for %d records", resp.getResultsCount(), recs.size())) {
      return 0;
    }
    Map<Integer, Long> lastOffset = new HashMap<>();
    for (int i = 0; i < recs.size(); i++) {
      PublishResult res = resp.getResults(i);
      Rec r = recs.get(i);
      if (!check(res.getErrorCode() == ErrorCode.ERROR_CODE_NONE, "Publish record %d: %s %s", i, res.getErrorCode(), res.getErrorMessage())) {
        continue;
      }
      int want = partitionForKey(r.key, partitions);
      check(res.getPartition() == want, "Publish: key %s went to partition %d, murmur2 says %d", hex(r.key), res.getPartition(), want);
      Long golden = goldenPartition.get(i);
      if (golden != null) {
        check(res.getPartition() == golden, "Publish: golden key %s went to partition %d, golden %d", hex(r.key), res.getPartition(), golden);
      }
      Long last = lastOffset.put(res.getPartition(), res.getOffset());
      if (last != null) {
        check(res.getOffset() > last, "Publish: offsets of partition %d keep the request's order", res.getPartition());
      }
      r.offset = res.getOffset();
      r.timestampMs = res.getTimestampMs();
      add(res.getPartition(), r);
    }
    return recs.size();
  }

  /**
   * A few Publish requests on one PublishStream, all sent before any answer is read: the answers
   * must come in request order, each record where murmur2 says.
   */
  int publishStream() throws InterruptedException {
    List<PublishResponse> answers = Collections.synchronizedList(new ArrayList<>());
    AtomicReference<Throwable> failed = new AtomicReference<>();
    CountDownLatch done = new CountDownLatch(1);
    ManagedChannel ch = channels.computeIfAbsent(bootstrap, a -> ManagedChannelBuilder.forTarget(a).usePlaintext().build());
    StreamObserver<PublishStreamRequest> requests = HeadwaterServiceGrpc.newStub(ch)
        .withDeadlineAfter(CALL_TIMEOUT_S, TimeUnit.SECONDS)
        .publishStream(new StreamObserver<PublishStreamResponse>() {
          @Override
          public void onNext(PublishStreamResponse r) {
            answers.add(r.getResponse());
          }

          @Override
          public void onError(Throwable t) {
            failed.set(t);
            done.countDown();
          }

          @Override
          public void onCompleted() {
            done.countDown();
          }
        });
    List<List<Rec>> sent = new ArrayList<>();
    for (int req = 0; req < 3; req++) {
      List<Rec> recs = new ArrayList<>();
      PublishRequest.Builder pr = PublishRequest.newBuilder().setTopic(topic);
      for (int i = 0; i < 4; i++) {
        Rec r = new Rec(("java-stream-" + req + "-" + i).getBytes(StandardCharsets.UTF_8),
            ("java-stream-value-" + req + "-" + i).getBytes(StandardCharsets.UTF_8));
        r.headers.add(new Header("request", Integer.toString(req).getBytes(StandardCharsets.UTF_8)));
        recs.add(r);
        pr.addRecords(PublishRecord.newBuilder().setKey(bytes(r.key)).setValue(bytes(r.value))
            .addHeaders(RecordHeader.newBuilder().setKey("request").setValue(bytes(r.headers.get(0).value()))));
      }
      sent.add(recs);
      requests.onNext(PublishStreamRequest.newBuilder().setRequest(pr).build());
    }
    requests.onCompleted();
    done.await(CALL_TIMEOUT_S + 5, TimeUnit.SECONDS);
    if (!check(failed.get() == null && done.getCount() == 0, "PublishStream via %s: %s", bootstrap, failed.get())) {
      return 0;
    }
    if (!check(answers.size() == sent.size(), "PublishStream: %d answers for %d requests", answers.size(), sent.size())) {
      return 0;
    }
    int total = 0;
    for (int req = 0; req < sent.size(); req++) {
      List<Rec> recs = sent.get(req);
      List<PublishResult> results = answers.get(req).getResultsList();
      if (!check(results.size() == recs.size(), "PublishStream: answer %d has %d results for %d records (answers in request order)",
          req, results.size(), recs.size())) {
        continue;
      }
      for (int i = 0; i < recs.size(); i++) {
        PublishResult res = results.get(i);
        Rec r = recs.get(i);
        if (!check(res.getErrorCode() == ErrorCode.ERROR_CODE_NONE, "PublishStream request %d record %d: %s %s",
            req, i, res.getErrorCode(), res.getErrorMessage())) {
          continue;
        }
        int want = partitionForKey(r.key, partitions);
        check(res.getPartition() == want, "PublishStream: key %s went to partition %d, murmur2 says %d", show(r.key), res.getPartition(), want);
        r.offset = res.getOffset();
        r.timestampMs = res.getTimestampMs();
        add(res.getPartition(), r);
        total++;
      }
    }
    return total;
  }

  static boolean retriable(ErrorCode code) {
    switch (code) {
      case ERROR_CODE_NOT_LEADER_OR_FOLLOWER:
      case ERROR_CODE_LEADER_NOT_AVAILABLE:
      case ERROR_CODE_NOT_ENOUGH_REPLICAS:
      case ERROR_CODE_REQUEST_TIMED_OUT:
      case ERROR_CODE_FENCED_LEADER_EPOCH:
        return true;
      default:
        return false;
    }
  }

  /** One batch per partition (keys spread by murmur2; none or gzip), sent to each leader with Produce. */
  int produceNative() throws InterruptedException {
    Map<Integer, List<Rec>> byPartition = new TreeMap<>();
    long now = System.currentTimeMillis();
    for (int i = 0; i < 36; i++) {
      byte[] key = ("java-native-" + i).getBytes(StandardCharsets.UTF_8);
      Rec r = new Rec(key, ("java-native-value-" + i).getBytes(StandardCharsets.UTF_8));
      r.timestampMs = now + (i % 5) - 2; // not monotonic: max_timestamp_ms is the largest
      r.headers.add(new Header("batch", "native".getBytes(StandardCharsets.UTF_8)));
      r.headers.add(new Header("i", Integer.toString(i).getBytes(StandardCharsets.UTF_8)));
      if (i % 7 == 0) {
        r.value = null;
        r.headers.add(new Header("none", null));
      }
      byPartition.computeIfAbsent(partitionForKey(key, partitions), p -> new ArrayList<>()).add(r);
    }
    int total = 0;
    for (Map.Entry<Integer, List<Rec>> e : byPartition.entrySet()) {
      int p = e.getKey();
      CompressionType codec = p % 2 == 0 ? CompressionType.COMPRESSION_TYPE_NONE : CompressionType.COMPRESSION_TYPE_GZIP;
      RecordBatch batch = buildBatch(e.getValue(), codec, -1, -1, -1);
      Long base = produceBatch(p, batch);
      if (base == null) {
        continue;
      }
      for (int i = 0; i < e.getValue().size(); i++) {
        Rec r = e.getValue().get(i);
        r.offset = base + i;
        add(p, r);
      }
      total += e.getValue().size();
    }
    return total;
  }

  Long produceBatch(int partition, RecordBatch batch) throws InterruptedException {
    String last = "";
    for (int attempt = 0; attempt < 10; attempt++) {
      ProduceRequest req = ProduceRequest.newBuilder().setAcks(-1).addTopics(ProduceTopicData.newBuilder().setTopic(topic)
          .addPartitions(ProducePartitionData.newBuilder().setPartition(partition).addBatches(batch))).build();
      try {
        ProduceResponse resp = stub(leaders.get(partition)).produce(req);
        ProducePartitionResponse pr = resp.getTopics(0).getPartitions(0);
        if (pr.getErrorCode() == ErrorCode.ERROR_CODE_NONE) {
          check(true, "");
          return pr.getBaseOffset();
        }
        last = pr.getErrorCode() + " " + pr.getErrorMessage();
        if (!retriable(pr.getErrorCode())) {
          break;
        }
      } catch (StatusRuntimeException e) {
        last = e.getStatus().toString();
      }
      Thread.sleep(100L * (attempt + 1));
      refreshLeaders();
    }
    check(false, "Produce %s/%d (%s batch) to its leader: %s", topic, partition, batch.getCompression(), last);
    return null;
  }

  static Rec fromConsumerRecord(ConsumerRecord r) {
    Rec rec = new Rec(r.hasKey() ? r.getKey().toByteArray() : null, r.hasValue() ? r.getValue().toByteArray() : null);
    rec.offset = r.getOffset();
    rec.timestampMs = r.getTimestampMs();
    for (RecordHeader h : r.getHeadersList()) {
      rec.headers.add(new Header(h.getKey(), h.hasValue() ? h.getValue().toByteArray() : null));
    }
    return rec;
  }

  /** Each partition streamed from the earliest offset with decode, from the bootstrap node. */
  void readSubscribe() {
    for (int p = 0; p < partitions; p++) {
      List<Rec> want = want(p);
      List<Rec> got = new ArrayList<>();
      if (!want.isEmpty()) {
        long lastOffset = want.get(want.size() - 1).offset;
        // Cancelled once the last record is in: a Subscribe stream never ends by itself.
        Context.CancellableContext call = Context.current().withCancellation();
        Context previous = call.attach();
        try {
          Iterator<SubscribeResponse> it = stub(bootstrap).subscribe(
              SubscribeRequest.newBuilder().setTopic(topic).setPartition(p).setOffset(-2).setDecode(true).build());
          outer:
          while (it.hasNext()) {
            SubscribeResponse msg = it.next();
            if (!check(msg.getErrorCode() == ErrorCode.ERROR_CODE_NONE, "Subscribe %s/%d: %s %s", topic, p, msg.getErrorCode(), msg.getErrorMessage())) {
              break;
            }
            for (ConsumerRecord r : msg.getRecordsList()) {
              got.add(fromConsumerRecord(r));
              if (r.getOffset() >= lastOffset) {
                break outer;
              }
            }
          }
        } catch (StatusRuntimeException e) {
          check(false, "Subscribe %s/%d: %s", topic, p, e.getStatus());
        } finally {
          call.detach(previous);
          call.cancel(null);
        }
      }
      String diff = sameRecords(got, want);
      check(diff.isEmpty(), "Subscribe %s/%d: %s", topic, p, diff);
    }
  }

  /**
   * Every partition from offset 0 with Fetch: decoded by the node (asked of the bootstrap node,
   * whatever it leads), or raw batches from each leader, CRC-checked and decoded here.
   */
  void readFetch(boolean decode) throws InterruptedException {
    String how = decode ? "decoded" : "raw";
    Map<Integer, List<Rec>> got = new HashMap<>();
    Map<Integer, Long> next = new HashMap<>();
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(CALL_TIMEOUT_S);
    while (System.nanoTime() < deadline) {
      Map<String, List<FetchPartition>> pending = new HashMap<>();
      for (int p = 0; p < partitions; p++) {
        List<Rec> want = want(p);
        long n = next.getOrDefault(p, 0L);
        if (want.isEmpty() || n > want.get(want.size() - 1).offset) {
          continue;
        }
        String addr = decode ? bootstrap : leaders.get(p);
        pending.computeIfAbsent(addr, a -> new ArrayList<>()).add(FetchPartition.newBuilder()
            .setPartition(p).setFetchOffset(n).setLastFetchedEpoch(-1).setLogStartOffset(-1).build());
      }
      if (pending.isEmpty()) {
        break;
      }
      for (Map.Entry<String, List<FetchPartition>> e : pending.entrySet()) {
        FetchResponse resp;
        try {
          resp = stub(e.getKey()).fetch(FetchRequest.newBuilder().setMaxWaitMs(500).setDecode(decode)
              .addTopics(FetchTopic.newBuilder().setTopic(topic).addAllPartitions(e.getValue())).build());
        } catch (StatusRuntimeException ex) {
          check(false, "Fetch %s from %s: %s", how, e.getKey(), ex.getStatus());
          return;
        }
        for (FetchTopicResponse t : resp.getTopicsList()) {
          for (FetchPartitionResponse pr : t.getPartitionsList()) {
            int p = pr.getPartition();
            if (!decode && pr.getErrorCode() == ErrorCode.ERROR_CODE_NOT_LEADER_OR_FOLLOWER) {
              refreshLeaders();
              continue;
            }
            if (!check(pr.getErrorCode() == ErrorCode.ERROR_CODE_NONE, "Fetch %s %s/%d: %s %s", how, topic, p, pr.getErrorCode(), pr.getErrorMessage())) {
              return;
            }
            List<Rec> recs = new ArrayList<>();
            for (ConsumerRecord r : pr.getRecordsList()) {
              recs.add(fromConsumerRecord(r));
            }
            for (RecordBatch b : pr.getBatchesList()) {
              check(batchCrc(b) == Integer.toUnsignedLong(b.getCrc()), "Fetch raw %s/%d: batch at %d has a valid CRC", topic, p, b.getBaseOffset());
              try {
                recs.addAll(decodeBatch(b));
              } catch (IOException ex) {
                check(false, "Fetch raw %s/%d: batch at %d (%s) decodes: %s", topic, p, b.getBaseOffset(), b.getCompression(), ex);
                return;
              }
            }
            for (Rec r : recs) {
              if (r.offset >= next.getOrDefault(p, 0L)) { // a batch may start before the fetch offset
                got.computeIfAbsent(p, x -> new ArrayList<>()).add(r);
                next.put(p, r.offset + 1);
              }
            }
          }
        }
      }
    }
    for (int p = 0; p < partitions; p++) {
      String diff = sameRecords(got.getOrDefault(p, List.of()), want(p));
      check(diff.isEmpty(), "Fetch %s %s/%d: %s", how, topic, p, diff);
    }
  }

  public static void main(String[] args) throws Exception {
    String topic = "";
    String goldenPath = "proto/testdata/golden.json"; // from the repository's root
    int numPartitions = 6;
    List<String> rest = new ArrayList<>();
    for (int i = 0; i < args.length; i++) {
      switch (args[i]) {
        case "--topic": topic = args[++i]; break;
        case "--golden": goldenPath = args[++i]; break;
        case "--partitions": numPartitions = Integer.parseInt(args[++i]); break;
        case "-h": case "--help":
          System.out.println("usage: HeadwaterExample [--topic NAME] [--partitions N] [--golden PATH] BOOTSTRAP");
          return;
        default: rest.add(args[i]);
      }
    }
    if (rest.size() != 1) {
      fatal("usage: HeadwaterExample [--topic NAME] [--partitions N] [--golden PATH] BOOTSTRAP");
    }
    if (topic.isEmpty()) {
      topic = String.format("example-java-%08x", ThreadLocalRandom.current().nextInt());
    }
    String bootstrap = rest.get(0).split(",")[0];
    long started = System.nanoTime();
    Map<String, Object> golden = obj(Json.parse(Files.readString(Path.of(goldenPath))));
    HeadwaterExample ex = new HeadwaterExample(bootstrap, topic);
    int code;
    try {
      ex.checkGolden(golden);
      int goldenChecks = ex.passed;
      ex.createTopic(numPartitions);
      ex.refreshLeaders();
      int published = ex.publish(golden) + ex.publishStream();
      int nativeCount = ex.produceNative();
      ex.readSubscribe();
      ex.readFetch(true);
      ex.readFetch(false);
      System.out.printf("java example: topic %s (%d partitions) via %s%n", topic, ex.partitions, bootstrap);
      System.out.printf("  golden vectors: %d batches (%d decoded here, %d rebuilt byte for byte), %d partitioner keys, %d checks%n",
          ex.goldenBatches, ex.goldenDecoded, ex.goldenRebuilt, ex.goldenKeys, goldenChecks);
      System.out.printf("  wrote %d records (%d with Publish and PublishStream, %d in native batches); read back with Subscribe, Fetch decoded, Fetch raw%n",
          ex.count(), published, nativeCount);
      if (ex.failures.isEmpty()) {
        System.out.printf("OK: %d checks passed in %.1f s%n", ex.passed, (System.nanoTime() - started) / 1e9);
        code = 0;
      } else {
        System.out.printf("FAILED: %d of %d checks failed (first: %s)%n", ex.failures.size(), ex.failures.size() + ex.passed, ex.failures.get(0));
        code = 1;
      }
    } catch (StatusRuntimeException e) {
      System.err.println("headwater-example-java: " + e.getStatus());
      code = 2;
    } finally {
      for (ManagedChannel ch : ex.channels.values()) {
        ch.shutdownNow();
      }
    }
    System.exit(code);
  }
}
