package main

// Checks the codec in batch.go against proto/testdata/golden.json, the vectors every language shares.

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"

	"google.golang.org/protobuf/proto"

	pb "headwater.example/v1"
)

type goldenHeader struct {
	Key   string  `json:"key"`
	Value *string `json:"value"`
}

type goldenRecord struct {
	OffsetDelta      int32          `json:"offset_delta"`
	TimestampDeltaMs int64          `json:"timestamp_delta_ms"`
	Key              *string        `json:"key"`
	Value            *string        `json:"value"`
	Headers          []goldenHeader `json:"headers"`
}

type goldenBatch struct {
	Name                string         `json:"name"`
	Compression         string         `json:"compression"`
	Batch               string         `json:"batch"`
	Records             string         `json:"records"`
	RecordsUncompressed string         `json:"records_uncompressed"`
	CrcHeader           string         `json:"crc_header"`
	Crc                 uint32         `json:"crc"`
	FirstTimestampMs    int64          `json:"first_timestamp_ms"`
	MaxTimestampMs      int64          `json:"max_timestamp_ms"`
	LastOffsetDelta     int32          `json:"last_offset_delta"`
	RecordCount         int32          `json:"record_count"`
	ProducerID          int64          `json:"producer_id"`
	ProducerEpoch       int32          `json:"producer_epoch"`
	BaseSequence        int32          `json:"base_sequence"`
	Decoded             []goldenRecord `json:"decoded"`
}

type goldenKey struct {
	Key        string           `json:"key"`
	Murmur2    int32            `json:"murmur2"`
	Partitions map[string]int32 `json:"partitions"`
}

type golden struct {
	Crc32cCheck struct {
		Input string `json:"input"`
		Crc   uint32 `json:"crc"`
	} `json:"crc32c_check"`
	Batches     []goldenBatch `json:"batches"`
	Partitioner []goldenKey   `json:"partitioner"`
}

func loadGolden(path string) (*golden, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	g := &golden{}
	if err := json.Unmarshal(data, g); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	if len(g.Batches) == 0 || len(g.Partitioner) == 0 {
		return nil, fmt.Errorf("%s holds no batches or no partitioner vectors", path)
	}
	return g, nil
}

func unhex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(fmt.Sprintf("golden vectors: bad hex %q", s))
	}
	return b
}

func unhexOpt(s *string) []byte {
	if s == nil {
		return nil
	}
	return optBytes(unhex(*s))
}

// checkGolden checks CRC32C, every golden batch (header bytes, CRC, records, decompressed payload,
// decoded records; for uncompressed batches the builder's bytes too) and the partitioner vectors.
// It returns how many batches it decoded and how many it rebuilt byte for byte.
func checkGolden(g *golden, c *checker) (decoded, rebuilt int) {
	c.check(crc32c(unhex(g.Crc32cCheck.Input)) == g.Crc32cCheck.Crc, "golden: crc32c of the check input")
	for _, gb := range g.Batches {
		name := "golden batch " + gb.Name
		comp, known := pb.CompressionType_value[gb.Compression]
		if !c.check(known, "%s: known compression %s", name, gb.Compression) {
			continue
		}
		b := &pb.RecordBatch{}
		if !c.check(proto.Unmarshal(unhex(gb.Batch), b) == nil, "%s: parses as a RecordBatch", name) {
			continue
		}
		c.check(b.Crc == gb.Crc, "%s: crc field %d, golden %d", name, b.Crc, gb.Crc)
		c.check(bytes.Equal(b.Records, unhex(gb.Records)), "%s: records field", name)
		c.check(int32(b.Compression) == comp && b.FirstTimestampMs == gb.FirstTimestampMs &&
			b.MaxTimestampMs == gb.MaxTimestampMs && b.LastOffsetDelta == gb.LastOffsetDelta &&
			b.RecordCount == gb.RecordCount && b.ProducerId == gb.ProducerID &&
			b.ProducerEpoch == gb.ProducerEpoch && b.BaseSequence == gb.BaseSequence,
			"%s: header fields", name)
		c.check(bytes.Equal(crcHeader(b), unhex(gb.CrcHeader)), "%s: 44-byte CRC header", name)
		c.check(crc32c(append(unhex(gb.CrcHeader), unhex(gb.Records)...)) == gb.Crc,
			"%s: CRC32C over header and records", name)
		c.check(batchCRC(b) == gb.Crc, "%s: CRC computed from the parsed batch", name)
		raw, err := decompress(b.Compression, b.Records)
		if !c.check(err == nil, "%s: decompresses (%v)", name, err) {
			continue
		}
		c.check(bytes.Equal(raw, unhex(gb.RecordsUncompressed)), "%s: decompressed records", name)
		// Compressors differ in their bytes: what must hold is that this one's output inflates back.
		again, err := compress(b.Compression, raw)
		if c.check(err == nil, "%s: compresses (%v)", name, err) {
			back, err := decompress(b.Compression, again)
			c.check(err == nil && bytes.Equal(back, raw), "%s: this codec's compression inflates back (%v)", name, err)
		}
		got, err := decodeBatch(b)
		if !c.check(err == nil, "%s: decodes (%v)", name, err) {
			continue
		}
		want := make([]Rec, len(gb.Decoded))
		for i, r := range gb.Decoded {
			want[i] = Rec{Offset: int64(r.OffsetDelta), TimestampMs: gb.FirstTimestampMs + r.TimestampDeltaMs,
				Key: unhexOpt(r.Key), Value: unhexOpt(r.Value)}
			for _, h := range r.Headers {
				want[i].Headers = append(want[i].Headers, Header{h.Key, unhexOpt(h.Value)})
			}
		}
		c.check(sameRecords(got, want, true) == "", "%s: decoded records: %s", name, sameRecords(got, want, true))
		decoded++
		if b.Compression == pb.CompressionType_COMPRESSION_TYPE_NONE {
			_, built, err := buildBatch(want, BatchFields{pb.CompressionType_COMPRESSION_TYPE_NONE,
				gb.ProducerID, gb.ProducerEpoch, gb.BaseSequence})
			c.check(err == nil && bytes.Equal(built, unhex(gb.Batch)),
				"%s: the builder reproduces the batch byte for byte (built %x)", name, built)
			rebuilt++
		}
	}
	for _, k := range g.Partitioner {
		key := unhex(k.Key)
		c.check(murmur2(key) == k.Murmur2, "golden partitioner: murmur2(%s) = %d, golden %d", k.Key, murmur2(key), k.Murmur2)
		for n, p := range k.Partitions {
			var count int32
			fmt.Sscan(n, &count)
			c.check(count > 0 && partitionForKey(key, count) == p,
				"golden partitioner: key %s over %s partitions: %d, golden %d", k.Key, n, partitionForKey(key, count), p)
		}
	}
	return decoded, rebuilt
}

// sameRecords says how got differs from want ("" when equal): offsets, keys, values (absent versus
// empty included), headers, and the timestamps when withTimestamps.
func sameRecords(got, want []Rec, withTimestamps bool) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d records, want %d", len(got), len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		switch {
		case g.Offset != w.Offset:
			return fmt.Sprintf("record %d: offset %d, want %d", i, g.Offset, w.Offset)
		case withTimestamps && g.TimestampMs != w.TimestampMs:
			return fmt.Sprintf("offset %d: timestamp %d, want %d", g.Offset, g.TimestampMs, w.TimestampMs)
		case !sameOpt(g.Key, w.Key):
			return fmt.Sprintf("offset %d: key %s, want %s", g.Offset, show(g.Key), show(w.Key))
		case !sameOpt(g.Value, w.Value):
			return fmt.Sprintf("offset %d: value %s, want %s", g.Offset, show(g.Value), show(w.Value))
		case len(g.Headers) != len(w.Headers):
			return fmt.Sprintf("offset %d: %d headers, want %d", g.Offset, len(g.Headers), len(w.Headers))
		}
		for j := range g.Headers {
			if g.Headers[j].Key != w.Headers[j].Key || !sameOpt(g.Headers[j].Value, w.Headers[j].Value) {
				return fmt.Sprintf("offset %d: header %d is %q=%s, want %q=%s", g.Offset, j,
					g.Headers[j].Key, show(g.Headers[j].Value), w.Headers[j].Key, show(w.Headers[j].Value))
			}
		}
	}
	return ""
}

func sameOpt(a, b []byte) bool { return (a == nil) == (b == nil) && bytes.Equal(a, b) }

func show(b []byte) string {
	if b == nil {
		return "absent"
	}
	return fmt.Sprintf("%q", b)
}
