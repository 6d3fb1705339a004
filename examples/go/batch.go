package main

// The native batch format of records.proto, written from its comments: the Records message, the
// 44-byte big-endian CRC header, CRC32C, the compression framings, and Kafka's murmur2 partitioner.

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/pierrec/lz4"
	"google.golang.org/protobuf/proto"

	pb "headwater.example/v1"
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crc32c is CRC32C (Castagnoli), the checksum of records.proto.
func crc32c(data []byte) uint32 { return crc32.Checksum(data, castagnoli) }

// Header is one record header; a nil Value is an absent value (not an empty one).
type Header struct {
	Key   string
	Value []byte
}

// Rec is one record as the example writes and reads it. A nil Key or Value is absent: an absent key
// and an empty key differ, and an absent value is a tombstone.
type Rec struct {
	Offset      int64
	TimestampMs int64
	Key         []byte
	Value       []byte
	Headers     []Header
}

func optBytes(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append([]byte{}, b...) // non-nil, even when empty: present
}

// crcHeader packs the 44 bytes the CRC covers before the records bytes (records.proto).
func crcHeader(b *pb.RecordBatch) []byte {
	h := make([]byte, 44)
	be := binary.BigEndian
	be.PutUint32(h[0:], uint32(b.LastOffsetDelta))
	be.PutUint64(h[4:], uint64(b.FirstTimestampMs))
	be.PutUint64(h[12:], uint64(b.MaxTimestampMs))
	be.PutUint64(h[20:], uint64(b.ProducerId))
	be.PutUint32(h[28:], uint32(b.ProducerEpoch))
	be.PutUint32(h[32:], uint32(b.BaseSequence))
	be.PutUint32(h[36:], uint32(b.Compression))
	be.PutUint32(h[40:], uint32(b.RecordCount))
	return h
}

// batchCRC is CRC32C over the header and the records bytes as they are on the wire.
func batchCRC(b *pb.RecordBatch) uint32 {
	return crc32c(append(crcHeader(b), b.Records...))
}

func compress(c pb.CompressionType, data []byte) ([]byte, error) {
	var buf bytes.Buffer
	switch c {
	case pb.CompressionType_COMPRESSION_TYPE_NONE:
		return data, nil
	case pb.CompressionType_COMPRESSION_TYPE_GZIP:
		w := gzip.NewWriter(&buf)
		if _, err := w.Write(data); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
	case pb.CompressionType_COMPRESSION_TYPE_LZ4:
		w := lz4.NewWriter(&buf)
		if _, err := w.Write(data); err != nil {
			return nil, err
		}
		if err := w.Close(); err != nil {
			return nil, err
		}
	case pb.CompressionType_COMPRESSION_TYPE_ZSTD:
		enc, err := zstd.NewWriter(nil)
		if err != nil {
			return nil, err
		}
		defer enc.Close()
		return enc.EncodeAll(data, nil), nil
	default:
		return nil, fmt.Errorf("unknown compression %v", c)
	}
	return buf.Bytes(), nil
}

func decompress(c pb.CompressionType, data []byte) ([]byte, error) {
	switch c {
	case pb.CompressionType_COMPRESSION_TYPE_NONE:
		return data, nil
	case pb.CompressionType_COMPRESSION_TYPE_GZIP:
		r, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			return nil, err
		}
		return io.ReadAll(r)
	case pb.CompressionType_COMPRESSION_TYPE_LZ4:
		return io.ReadAll(lz4.NewReader(bytes.NewReader(data)))
	case pb.CompressionType_COMPRESSION_TYPE_ZSTD:
		dec, err := zstd.NewReader(nil)
		if err != nil {
			return nil, err
		}
		defer dec.Close()
		return dec.DecodeAll(data, nil)
	}
	return nil, fmt.Errorf("unknown compression %v", c)
}

// BatchFields are the producer-set fields a batch is built with besides its records.
type BatchFields struct {
	Compression   pb.CompressionType
	ProducerID    int64
	ProducerEpoch int32
	BaseSequence  int32
}

// NoProducer is a batch without a producer id (records.proto, Producer ids).
var NoProducer = BatchFields{ProducerID: -1, ProducerEpoch: -1, BaseSequence: -1}

// buildBatch builds a producer's batch (base_offset 0): offset deltas 0..n-1, timestamps as deltas
// from the first record's, max_timestamp_ms the largest, then the CRC over header and records. It
// returns the batch and its serialized bytes.
func buildBatch(recs []Rec, f BatchFields) (*pb.RecordBatch, []byte, error) {
	if len(recs) == 0 {
		return nil, nil, fmt.Errorf("a batch holds at least one record")
	}
	first := recs[0].TimestampMs
	maxTs := first
	payload := &pb.Records{}
	for i, r := range recs {
		if r.TimestampMs > maxTs {
			maxTs = r.TimestampMs
		}
		rec := &pb.Record{OffsetDelta: int32(i), TimestampDeltaMs: r.TimestampMs - first,
			Key: optBytes(r.Key), Value: optBytes(r.Value)}
		for _, h := range r.Headers {
			rec.Headers = append(rec.Headers, &pb.RecordHeader{Key: h.Key, Value: optBytes(h.Value)})
		}
		payload.Records = append(payload.Records, rec)
	}
	raw, err := proto.Marshal(payload)
	if err != nil {
		return nil, nil, err
	}
	records, err := compress(f.Compression, raw)
	if err != nil {
		return nil, nil, err
	}
	b := &pb.RecordBatch{
		LastOffsetDelta:  int32(len(recs) - 1),
		FirstTimestampMs: first,
		MaxTimestampMs:   maxTs,
		ProducerId:       f.ProducerID,
		ProducerEpoch:    f.ProducerEpoch,
		BaseSequence:     f.BaseSequence,
		Compression:      f.Compression,
		RecordCount:      int32(len(recs)),
		Records:          records,
	}
	b.Crc = batchCRC(b)
	out, err := proto.Marshal(b)
	return b, out, err
}

// decodeBatch reads a stored batch's records with absolute offsets and timestamps. Under
// LogAppendTime every record reads max_timestamp_ms (records.proto).
func decodeBatch(b *pb.RecordBatch) ([]Rec, error) {
	raw, err := decompress(b.Compression, b.Records)
	if err != nil {
		return nil, err
	}
	payload := &pb.Records{}
	if err := proto.Unmarshal(raw, payload); err != nil {
		return nil, err
	}
	var out []Rec
	for _, r := range payload.Records {
		ts := b.FirstTimestampMs + r.TimestampDeltaMs
		if b.TimestampType == pb.TimestampType_TIMESTAMP_TYPE_LOG_APPEND_TIME {
			ts = b.MaxTimestampMs
		}
		rec := Rec{Offset: b.BaseOffset + int64(r.OffsetDelta), TimestampMs: ts, Key: r.Key, Value: r.Value}
		for _, h := range r.Headers {
			rec.Headers = append(rec.Headers, Header{h.Key, h.Value})
		}
		out = append(out, rec)
	}
	return out, nil
}

// murmur2 is Kafka's Utils.murmur2: 32-bit MurmurHash2, seed 0x9747b28c, as a signed int.
func murmur2(data []byte) int32 {
	const m = 0x5bd1e995
	n := len(data)
	h := uint32(0x9747b28c) ^ uint32(n)
	n4 := n &^ 3
	for i := 0; i < n4; i += 4 {
		k := binary.LittleEndian.Uint32(data[i:])
		k *= m
		k ^= k >> 24
		k *= m
		h *= m
		h ^= k
	}
	switch n & 3 {
	case 3:
		h ^= uint32(data[n4+2]) << 16
		fallthrough
	case 2:
		h ^= uint32(data[n4+1]) << 8
		fallthrough
	case 1:
		h ^= uint32(data[n4])
		h *= m
	}
	h ^= h >> 13
	h *= m
	h ^= h >> 15
	return int32(h)
}

// partitionForKey is the partition of a keyed record: (murmur2(key) & 0x7fffffff) % partitions.
func partitionForKey(key []byte, partitions int32) int32 {
	return (murmur2(key) & 0x7fffffff) % partitions
}
