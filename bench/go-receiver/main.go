// A reference webhook receiver for `carhook-bench --figure receiver`: what a Go developer would
// write with the standard library and franz-go to do the receiver's job on the bench's load. It
// verifies SC-Signature (hex HMAC-SHA256 of the body, each configured token tried in turn, each
// comparison constant-time), reads the vehicle id with encoding/json, produces the raw body keyed
// by it with acks=all (idempotent, LZ4, 2 ms linger: carhook's producer settings) and answers 200
// only once the broker acknowledged, 503 when it did not. No logging (but of a failed produce), no
// metrics, no spans.
//
// Configured by environment: GO_RECEIVER_LISTEN, GO_RECEIVER_BROKERS, GO_RECEIVER_TOPIC,
// GO_RECEIVER_TOKENS (comma-separated).
package main

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

type envelope struct {
	Data struct {
		Vehicle struct {
			ID string `json:"id"`
		} `json:"vehicle"`
	} `json:"data"`
}

func mustEnv(name string) string {
	v := os.Getenv(name)
	if v == "" {
		log.Fatalf("%s must be set", name)
	}
	return v
}

func main() {
	listen := mustEnv("GO_RECEIVER_LISTEN")
	topic := mustEnv("GO_RECEIVER_TOPIC")
	var tokens [][]byte
	for _, t := range strings.Split(mustEnv("GO_RECEIVER_TOKENS"), ",") {
		tokens = append(tokens, []byte(t))
	}
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(mustEnv("GO_RECEIVER_BROKERS"), ",")...),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerBatchCompression(kgo.Lz4Compression()),
		kgo.ProducerLinger(2*time.Millisecond),
		kgo.RecordDeliveryTimeout(10*time.Second),
	)
	if err != nil {
		log.Fatalf("kafka client: %v", err)
	}
	defer cl.Close()

	http.HandleFunc("/webhooks/smartcar", func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, 1<<20))
		if err != nil {
			http.Error(w, "body", http.StatusBadRequest)
			return
		}
		sig, err := hex.DecodeString(r.Header.Get("SC-Signature"))
		if err != nil {
			http.Error(w, "signature", http.StatusUnauthorized)
			return
		}
		verified := false
		for _, t := range tokens {
			mac := hmac.New(sha256.New, t)
			mac.Write(body)
			if hmac.Equal(mac.Sum(nil), sig) {
				verified = true
				break
			}
		}
		if !verified {
			http.Error(w, "signature", http.StatusUnauthorized)
			return
		}
		var env envelope
		if err := json.Unmarshal(body, &env); err != nil || env.Data.Vehicle.ID == "" {
			http.Error(w, "envelope", http.StatusBadRequest)
			return
		}
		rec := &kgo.Record{Topic: topic, Key: []byte(env.Data.Vehicle.ID), Value: body}
		if err := cl.ProduceSync(r.Context(), rec).FirstErr(); err != nil {
			log.Printf("produce: %v", err)
			w.Header().Set("Retry-After", "5")
			http.Error(w, "kafka", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"status":"accepted"}`)
	})
	if err := cl.Ping(context.Background()); err != nil {
		log.Fatalf("kafka ping: %v", err)
	}
	log.Fatal(http.ListenAndServe(listen, nil))
}
