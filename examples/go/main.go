// A Headwater client in Go, from the gRPC contract alone (proto/headwater/v1).
//
// Creates a topic, produces keyed records the simple way (Publish, through any node) and the native
// way (RecordBatch bytes built here, sent to each partition's leader with Produce), reads them back
// with Subscribe and Fetch, and checks every record, the partitioner and the batch codec against the
// golden vectors. Exits 0 only when every check passed.
//
//	headwater-example-go [-topic NAME] [-partitions N] [-golden golden.json] BOOTSTRAP
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"

	pb "headwater.example/v1"
)

const callTimeout = 30 * time.Second

// checker counts passed checks and keeps the failed ones.
type checker struct {
	passed   int
	failures []string
}

func (c *checker) check(ok bool, format string, args ...interface{}) bool {
	if ok {
		c.passed++
	} else {
		msg := fmt.Sprintf(format, args...)
		c.failures = append(c.failures, msg)
		fmt.Fprintln(os.Stderr, "FAILED:", msg)
	}
	return ok
}

func fatal(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "headwater-example-go: "+format+"\n", args...)
	os.Exit(2)
}

// cluster holds one connection per node address and the topic's layout.
type cluster struct {
	conns      map[string]*grpc.ClientConn
	bootstrap  string
	partitions int32
	leaders    map[int32]string // partition -> leader address
}

func (cl *cluster) client(addr string) pb.HeadwaterServiceClient {
	conn, ok := cl.conns[addr]
	if !ok {
		var err error
		conn, err = grpc.Dial(addr, grpc.WithInsecure())
		if err != nil {
			fatal("cannot dial %s: %v", addr, err)
		}
		cl.conns[addr] = conn
	}
	return pb.NewHeadwaterServiceClient(conn)
}

// refreshLeaders asks the bootstrap node for the topic's partitions until each has a leader.
func (cl *cluster) refreshLeaders(topic string) error {
	deadline := time.Now().Add(callTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		md, err := cl.client(cl.bootstrap).Metadata(ctx, &pb.MetadataRequest{Topics: []string{topic}})
		cancel()
		if err != nil {
			return fmt.Errorf("Metadata: %v", err)
		}
		nodes := map[int32]string{}
		for _, n := range md.Nodes {
			nodes[n.NodeId] = fmt.Sprintf("%s:%d", n.Host, n.Port)
		}
		cl.leaders = map[int32]string{}
		for _, t := range md.Topics {
			if t.Name != topic || t.ErrorCode != pb.ErrorCode_ERROR_CODE_NONE {
				continue
			}
			cl.partitions = int32(len(t.Partitions))
			for _, p := range t.Partitions {
				if addr, ok := nodes[p.LeaderId]; ok && p.LeaderId >= 0 {
					cl.leaders[p.Partition] = addr
				}
			}
		}
		if cl.partitions > 0 && int32(len(cl.leaders)) == cl.partitions {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("topic %s: %d of %d partitions have a leader after %v",
				topic, len(cl.leaders), cl.partitions, callTimeout)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// written is what the example wrote, by partition and offset, to compare reads against.
type written map[int32]map[int64]Rec

func (w written) add(partition int32, r Rec) {
	if w[partition] == nil {
		w[partition] = map[int64]Rec{}
	}
	w[partition][r.Offset] = r
}

func (w written) sorted(partition int32) []Rec {
	var out []Rec
	for _, r := range w[partition] {
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Offset < out[j].Offset })
	return out
}

func (w written) count() int {
	n := 0
	for _, m := range w {
		n += len(m)
	}
	return n
}

func main() {
	topic := flag.String("topic", "", "topic to create (default: a random name)")
	partitions := flag.Int("partitions", 6, "partitions of the topic")
	goldenPath := flag.String("golden", defaultGolden(), "the golden vectors")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: headwater-example-go [-topic NAME] [-partitions N] [-golden PATH] BOOTSTRAP")
		os.Exit(2)
	}
	bootstrap := strings.Split(flag.Arg(0), ",")[0]
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	if *topic == "" {
		*topic = fmt.Sprintf("example-go-%08x", rng.Uint32())
	}
	started := time.Now()
	c := &checker{}

	g, err := loadGolden(*goldenPath)
	if err != nil {
		fatal("golden vectors: %v", err)
	}
	goldenDecoded, goldenRebuilt := checkGolden(g, c)
	goldenChecks := c.passed

	cl := &cluster{conns: map[string]*grpc.ClientConn{}, bootstrap: bootstrap}
	defer func() {
		for _, conn := range cl.conns {
			conn.Close()
		}
	}()
	createTopic(cl, *topic, int32(*partitions))
	if err := cl.refreshLeaders(*topic); err != nil {
		fatal("%v", err)
	}
	w := written{}
	published := publish(cl, c, g, *topic, w)
	published += publishStream(cl, c, *topic, w)
	native := produceNative(cl, c, *topic, w)
	readSubscribe(cl, c, *topic, w)
	readFetch(cl, c, *topic, w, true)
	readFetch(cl, c, *topic, w, false)

	fmt.Printf("go example: topic %s (%d partitions) via %s\n", *topic, cl.partitions, bootstrap)
	fmt.Printf("  golden vectors: %d batches (%d decoded here, %d rebuilt byte for byte), %d partitioner keys, %d checks\n",
		len(g.Batches), goldenDecoded, goldenRebuilt, len(g.Partitioner), goldenChecks)
	fmt.Printf("  wrote %d records (%d with Publish and PublishStream, %d in native batches); read back with Subscribe, Fetch decoded, Fetch raw\n",
		w.count(), published, native)
	if len(c.failures) > 0 {
		fmt.Printf("FAILED: %d of %d checks failed (first: %s)\n", len(c.failures), len(c.failures)+c.passed, c.failures[0])
		os.Exit(1)
	}
	fmt.Printf("OK: %d checks passed in %.1f s\n", c.passed, time.Since(started).Seconds())
}

// defaultGolden is the repository's golden vectors, found from the executable (examples/go/build/).
func defaultGolden() string {
	rel := filepath.Join("proto", "testdata", "golden.json")
	if exe, err := os.Executable(); err == nil {
		return filepath.Join(filepath.Dir(exe), "..", "..", "..", rel)
	}
	return rel
}

func createTopic(cl *cluster, topic string, partitions int32) {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := cl.client(cl.bootstrap).CreateTopics(ctx, &pb.CreateTopicsRequest{
		Topics: []*pb.CreatableTopic{{Name: topic, NumPartitions: partitions}}})
	if err != nil {
		fatal("CreateTopics via %s: %v", cl.bootstrap, err)
	}
	for _, t := range resp.Topics {
		if t.ErrorCode != pb.ErrorCode_ERROR_CODE_NONE {
			fatal("CreateTopics %s: %v %s (the example needs a new topic)", topic, t.ErrorCode, t.ErrorMessage)
		}
	}
}

// publish sends plain records through the bootstrap node: the golden partitioner keys, keyed records
// with headers, an empty key and a tombstone. Each answered partition must be the example's own
// murmur2 partition (and the golden one for the golden keys).
func publish(cl *cluster, c *checker, g *golden, topic string, w written) int {
	var recs []Rec
	goldenPartition := map[int]int32{}
	for i, k := range g.Partitioner {
		if p, ok := k.Partitions[fmt.Sprint(cl.partitions)]; ok {
			goldenPartition[len(recs)] = p
		}
		recs = append(recs, Rec{Key: optBytes(unhex(k.Key)), Value: []byte(fmt.Sprintf("golden-key-%d", i))})
	}
	for i := 0; i < 24; i++ {
		r := Rec{Key: []byte(fmt.Sprintf("go-key-%d", i%8)), Value: []byte(fmt.Sprintf("go-publish-%d", i))}
		if i%3 == 0 {
			r.Headers = []Header{{"lang", []byte("go")}, {"absent", nil}, {"empty", []byte{}}}
		}
		if i == 20 {
			r.Value = nil // a tombstone
		}
		recs = append(recs, r)
	}
	req := &pb.PublishRequest{Topic: topic}
	for _, r := range recs {
		pr := &pb.PublishRecord{Key: optBytes(r.Key), Value: optBytes(r.Value)}
		for _, h := range r.Headers {
			pr.Headers = append(pr.Headers, &pb.RecordHeader{Key: h.Key, Value: optBytes(h.Value)})
		}
		req.Records = append(req.Records, pr)
	}
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	resp, err := cl.client(cl.bootstrap).Publish(ctx, req)
	if !c.check(err == nil, "Publish via %s: %v", cl.bootstrap, err) {
		return 0
	}
	if !c.check(len(resp.Results) == len(recs), "Publish: %d results for %d records", len(resp.Results), len(recs)) {
		return 0
	}
	lastOffset := map[int32]int64{}
	for i, res := range resp.Results {
		key := recs[i].Key
		if !c.check(res.ErrorCode == pb.ErrorCode_ERROR_CODE_NONE, "Publish record %d: %v %s",
			i, res.ErrorCode, res.ErrorMessage) {
			continue
		}
		want := partitionForKey(key, cl.partitions)
		c.check(res.Partition == want, "Publish: key %x went to partition %d, murmur2 says %d", key, res.Partition, want)
		if p, ok := goldenPartition[i]; ok {
			c.check(res.Partition == p, "Publish: golden key %x went to partition %d, golden %d", key, res.Partition, p)
		}
		if last, seen := lastOffset[res.Partition]; seen {
			c.check(res.Offset > last, "Publish: offsets of partition %d keep the request's order", res.Partition)
		}
		lastOffset[res.Partition] = res.Offset
		r := recs[i]
		r.Offset, r.TimestampMs = res.Offset, res.TimestampMs
		w.add(res.Partition, r)
	}
	return len(recs)
}

// publishStream sends a few Publish requests on one PublishStream, all before reading an answer,
// and checks the answers come in request order, each record where murmur2 says.
func publishStream(cl *cluster, c *checker, topic string, w written) int {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	stream, err := cl.client(cl.bootstrap).PublishStream(ctx)
	if !c.check(err == nil, "PublishStream via %s: %v", cl.bootstrap, err) {
		return 0
	}
	var sent [][]Rec
	for req := 0; req < 3; req++ {
		var recs []Rec
		pr := &pb.PublishRequest{Topic: topic}
		for i := 0; i < 4; i++ {
			r := Rec{Key: []byte(fmt.Sprintf("go-stream-%d-%d", req, i)), Value: []byte(fmt.Sprintf("go-stream-value-%d-%d", req, i)),
				Headers: []Header{{"request", []byte(fmt.Sprint(req))}}}
			recs = append(recs, r)
			pr.Records = append(pr.Records, &pb.PublishRecord{Key: r.Key, Value: r.Value,
				Headers: []*pb.RecordHeader{{Key: "request", Value: r.Headers[0].Value}}})
		}
		if !c.check(stream.Send(&pb.PublishStreamRequest{Request: pr}) == nil, "PublishStream: send request %d", req) {
			return 0
		}
		sent = append(sent, recs)
	}
	c.check(stream.CloseSend() == nil, "PublishStream: close the sending side")
	total := 0
	for req, recs := range sent {
		resp, err := stream.Recv()
		if !c.check(err == nil, "PublishStream: answer %d: %v", req, err) {
			return total
		}
		results := resp.GetResponse().GetResults()
		if !c.check(len(results) == len(recs), "PublishStream: answer %d has %d results for %d records (answers in request order)",
			req, len(results), len(recs)) {
			return total
		}
		for i, res := range results {
			r := recs[i]
			if !c.check(res.ErrorCode == pb.ErrorCode_ERROR_CODE_NONE, "PublishStream request %d record %d: %v %s",
				req, i, res.ErrorCode, res.ErrorMessage) {
				continue
			}
			want := partitionForKey(r.Key, cl.partitions)
			c.check(res.Partition == want, "PublishStream: key %q went to partition %d, murmur2 says %d", r.Key, res.Partition, want)
			r.Offset, r.TimestampMs = res.Offset, res.TimestampMs
			w.add(res.Partition, r)
			total++
		}
	}
	return total
}

var nativeCodecs = []pb.CompressionType{
	pb.CompressionType_COMPRESSION_TYPE_NONE, pb.CompressionType_COMPRESSION_TYPE_GZIP,
	pb.CompressionType_COMPRESSION_TYPE_LZ4, pb.CompressionType_COMPRESSION_TYPE_ZSTD,
}

// produceNative builds one batch per partition (keys spread by murmur2, a codec per partition), and
// sends each to its partition's leader with Produce, retrying a leader change.
func produceNative(cl *cluster, c *checker, topic string, w written) int {
	byPartition := map[int32][]Rec{}
	now := time.Now().UnixMilli()
	for i := 0; i < 36; i++ {
		key := []byte(fmt.Sprintf("go-native-%d", i))
		r := Rec{Key: key, Value: []byte(fmt.Sprintf("go-native-value-%d", i)),
			TimestampMs: now + int64(i%5) - 2, // not monotonic: max_timestamp_ms is the largest
			Headers:     []Header{{"batch", []byte("native")}, {"i", []byte(fmt.Sprint(i))}}}
		if i%7 == 0 {
			r.Value = nil
			r.Headers = append(r.Headers, Header{"none", nil})
		}
		p := partitionForKey(key, cl.partitions)
		byPartition[p] = append(byPartition[p], r)
	}
	total := 0
	for p, recs := range byPartition {
		fields := NoProducer
		fields.Compression = nativeCodecs[int(p)%len(nativeCodecs)]
		batch, _, err := buildBatch(recs, fields)
		if !c.check(err == nil, "build batch for partition %d: %v", p, err) {
			continue
		}
		base, ok := produceBatch(cl, c, topic, p, batch)
		if !ok {
			continue
		}
		for i, r := range recs {
			r.Offset = base + int64(i)
			w.add(p, r)
		}
		total += len(recs)
	}
	return total
}

func retriable(code pb.ErrorCode) bool {
	switch code {
	case pb.ErrorCode_ERROR_CODE_NOT_LEADER_OR_FOLLOWER, pb.ErrorCode_ERROR_CODE_LEADER_NOT_AVAILABLE,
		pb.ErrorCode_ERROR_CODE_NOT_ENOUGH_REPLICAS, pb.ErrorCode_ERROR_CODE_REQUEST_TIMED_OUT,
		pb.ErrorCode_ERROR_CODE_FENCED_LEADER_EPOCH:
		return true
	}
	return false
}

func produceBatch(cl *cluster, c *checker, topic string, partition int32, batch *pb.RecordBatch) (int64, bool) {
	var last string
	for attempt := 0; attempt < 10; attempt++ {
		leader := cl.leaders[partition]
		ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
		resp, err := cl.client(leader).Produce(ctx, &pb.ProduceRequest{Acks: -1, Topics: []*pb.ProduceTopicData{{
			Topic: topic, Partitions: []*pb.ProducePartitionData{{Partition: partition, Batches: []*pb.RecordBatch{batch}}}}}})
		cancel()
		if err != nil {
			last = err.Error()
		} else if len(resp.Topics) != 1 || len(resp.Topics[0].Partitions) != 1 {
			last = fmt.Sprintf("malformed answer %v", resp)
		} else {
			pr := resp.Topics[0].Partitions[0]
			if pr.ErrorCode == pb.ErrorCode_ERROR_CODE_NONE {
				c.check(true, "")
				return pr.BaseOffset, true
			}
			last = fmt.Sprintf("%v %s", pr.ErrorCode, pr.ErrorMessage)
			if !retriable(pr.ErrorCode) {
				break
			}
		}
		time.Sleep(time.Duration(100*(attempt+1)) * time.Millisecond)
		if err := cl.refreshLeaders(topic); err != nil {
			last = err.Error()
		}
	}
	c.check(false, "Produce %s/%d (%v batch) to its leader: %s", topic, partition, batch.Compression, last)
	return 0, false
}

// readSubscribe streams each partition from the earliest offset with decode, from the bootstrap node.
func readSubscribe(cl *cluster, c *checker, topic string, w written) {
	for p := int32(0); p < cl.partitions; p++ {
		want := w.sorted(p)
		var got []Rec
		if len(want) > 0 {
			got = subscribe(cl, c, topic, p, want[len(want)-1].Offset)
		}
		c.check(sameRecords(got, want, true) == "", "Subscribe %s/%d: %s", topic, p, sameRecords(got, want, true))
	}
}

func subscribe(cl *cluster, c *checker, topic string, partition int32, lastOffset int64) []Rec {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	stream, err := cl.client(cl.bootstrap).Subscribe(ctx, &pb.SubscribeRequest{
		Topic: topic, Partition: partition, Offset: -2, Decode: true})
	if !c.check(err == nil, "Subscribe %s/%d: %v", topic, partition, err) {
		return nil
	}
	var got []Rec
	for {
		msg, err := stream.Recv()
		if err == io.EOF || !c.check(err == nil, "Subscribe %s/%d: %v", topic, partition, err) {
			return got
		}
		if !c.check(msg.ErrorCode == pb.ErrorCode_ERROR_CODE_NONE, "Subscribe %s/%d: %v %s",
			topic, partition, msg.ErrorCode, msg.ErrorMessage) {
			return got
		}
		for _, r := range msg.Records {
			got = append(got, fromConsumerRecord(r))
			if r.Offset >= lastOffset {
				return got
			}
		}
	}
}

func fromConsumerRecord(r *pb.ConsumerRecord) Rec {
	rec := Rec{Offset: r.Offset, TimestampMs: r.TimestampMs, Key: r.Key, Value: r.Value}
	for _, h := range r.Headers {
		rec.Headers = append(rec.Headers, Header{h.Key, h.Value})
	}
	return rec
}

// readFetch reads every partition from offset 0 with Fetch: decoded by the node (sent to the
// bootstrap node, whatever it leads), or raw batches from each leader, checked (CRC) and decoded here.
func readFetch(cl *cluster, c *checker, topic string, w written, decode bool) {
	how := "raw"
	if decode {
		how = "decoded"
	}
	got := map[int32][]Rec{}
	next := map[int32]int64{}
	deadline := time.Now().Add(callTimeout)
	for {
		pending := map[string][]*pb.FetchPartition{} // node address -> partitions to ask it
		for p := int32(0); p < cl.partitions; p++ {
			want := w.sorted(p)
			if len(want) == 0 || next[p] > want[len(want)-1].Offset {
				continue
			}
			addr := cl.bootstrap
			if !decode {
				addr = cl.leaders[p]
			}
			pending[addr] = append(pending[addr], &pb.FetchPartition{Partition: p, FetchOffset: next[p],
				LastFetchedEpoch: -1, LogStartOffset: -1})
		}
		if len(pending) == 0 || time.Now().After(deadline) {
			break
		}
		for addr, parts := range pending {
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			resp, err := cl.client(addr).Fetch(ctx, &pb.FetchRequest{MaxWaitMs: 500, Decode: decode,
				Topics: []*pb.FetchTopic{{Topic: topic, Partitions: parts}}})
			cancel()
			if !c.check(err == nil, "Fetch %s from %s: %v", how, addr, err) {
				return
			}
			for _, t := range resp.Topics {
				for _, pr := range t.Partitions {
					if pr.ErrorCode == pb.ErrorCode_ERROR_CODE_NOT_LEADER_OR_FOLLOWER && !decode {
						cl.refreshLeaders(topic)
						continue
					}
					if !c.check(pr.ErrorCode == pb.ErrorCode_ERROR_CODE_NONE, "Fetch %s %s/%d: %v %s",
						how, topic, pr.Partition, pr.ErrorCode, pr.ErrorMessage) {
						return
					}
					var recs []Rec
					for _, r := range pr.Records {
						recs = append(recs, fromConsumerRecord(r))
					}
					for _, b := range pr.Batches {
						c.check(batchCRC(b) == b.Crc, "Fetch raw %s/%d: batch at %d has a valid CRC",
							topic, pr.Partition, b.BaseOffset)
						decoded, err := decodeBatch(b)
						if !c.check(err == nil, "Fetch raw %s/%d: batch at %d (%v) decodes: %v",
							topic, pr.Partition, b.BaseOffset, b.Compression, err) {
							return
						}
						recs = append(recs, decoded...)
					}
					for _, r := range recs {
						if r.Offset >= next[pr.Partition] { // a batch may start before the fetch offset
							got[pr.Partition] = append(got[pr.Partition], r)
							next[pr.Partition] = r.Offset + 1
						}
					}
				}
			}
		}
	}
	for p := int32(0); p < cl.partitions; p++ {
		diff := sameRecords(got[p], w.sorted(p), true)
		c.check(diff == "", "Fetch %s %s/%d: %s", how, topic, p, diff)
	}
}
