package router

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// fakeVLLM stands in for a vLLM OpenAI server running our connector: as P
// it answers with one token and kv_transfer_params (and, like a remote
// engine, may POST /kv_ready); as D it streams SSE chunks ending in
// `data: [DONE]`, with usage when stream_options.include_usage is set.
type fakeVLLM struct {
	srv *httptest.Server

	mu      sync.Mutex
	bodies  []map[string]any
	headers []http.Header
	arrived []time.Time

	failWith     atomic.Int32 // status to return for the next failN requests
	failN        atomic.Int32
	unhealthy    atomic.Bool
	readyDelay   time.Duration // P: POST /kv_ready this long after answering; <0: before answering
	readyState   string        // P: "ready" (default), "failed", or "none" (never report)
	tokens       []string      // D: tokens to stream
	gap          time.Duration // D: pause between chunks
	breakAfter   int           // D: drop the connection after this many chunks (0: never)
	errorEvent   string        // D: after the tokens, this event's data (vLLM's in-band error), then [DONE]
	prefillDelay time.Duration // P: wait this long before answering
	headerDelay  time.Duration // D: wait this long before the stream's headers
	stallFirst   time.Duration // D: send the stream's headers, then wait this long before the first event
	readySent    atomic.Int64  // unix nanos of the last /kv_ready POST
	// P: the raw kv_transfer_params of its answer instead of the
	// connector's ("-": no kv_transfer_params at all, as a P without it).
	rawParams string
	// P: source_engine in its /kv_ready report, and
	// pegaflow_source_engine in its kv_transfer_params ("": none).
	readySource, paramsSource string
	// D: stream events of this many bytes until the router cancels the
	// request, then set floodCut.
	flood       int
	floodCut    atomic.Bool
	modelsFail  atomic.Int32 // status for GET /v1/models (0: the model list)
	modelsCalls atomic.Int32
	// legConns counts the completion requests per client connection
	// (remote address).
	legConns map[string]int
	// hangupReused: this many completion requests that come on a
	// connection that carried one before are read whole, then the
	// connection is closed without an answer (a backend that may have run
	// them).
	hangupReused atomic.Int32
	// POST /tokenize: one token per byte of the prompt (or of the chat
	// messages, "role:content\n" each, then "assistant:" when
	// add_generation_prompt), unless tokenizeRaw (an answer sent as is,
	// status tokenizeStatus or 200), tokenizeDelay (a wait first) or
	// tokenizeFlood (an endless token list) say otherwise.
	tokenizeRaw    string
	tokenizeStatus int
	tokenizeDelay  time.Duration
	tokenizeFlood  bool
	tokenizeCalls  atomic.Int32
}

func newFake(mutate func(*fakeVLLM)) *fakeVLLM { return newFakeOn(nil, mutate) }

// newFakeOn is newFake serving on lis (nil: a fresh loopback port).
func newFakeOn(lis net.Listener, mutate func(*fakeVLLM)) *fakeVLLM {
	f := &fakeVLLM{tokens: []string{"Hello", ",", " world", "!"}, readyState: "ready"}
	if mutate != nil {
		mutate(f)
	}
	if lis == nil {
		f.srv = httptest.NewServer(http.HandlerFunc(f.serve))
		return f
	}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	f.srv.Listener.Close()
	f.srv.Listener = lis
	f.srv.Start()
	return f
}

func (f *fakeVLLM) Close() { f.srv.Close() }

func (f *fakeVLLM) requests() []map[string]any {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]map[string]any(nil), f.bodies...)
}

func (f *fakeVLLM) requestHeaders() []http.Header {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]http.Header(nil), f.headers...)
}

func (f *fakeVLLM) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == "/tokenize" {
		f.tokenize(w, r)
		return
	}
	onConn := 0 // completion requests on this connection, this one included
	if r.Method == http.MethodPost && r.URL.Path != "/kv_ready" {
		f.mu.Lock()
		if f.legConns == nil {
			f.legConns = map[string]int{}
		}
		f.legConns[r.RemoteAddr]++
		onConn = f.legConns[r.RemoteAddr]
		f.mu.Unlock()
	}
	switch r.URL.Path {
	case "/health":
		if f.unhealthy.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		return
	case "/v1/models":
		f.modelsCalls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if st := f.modelsFail.Load(); st != 0 {
			w.WriteHeader(int(st))
			fmt.Fprintf(w, `{"error":{"message":"injected %d","type":"fake","code":%d}}`, st, st)
			return
		}
		fmt.Fprint(w, `{"object":"list","data":[{"id":"tiny","object":"model"}]}`)
		return
	}
	if r.Method != http.MethodPost || (r.URL.Path != "/v1/completions" && r.URL.Path != "/v1/chat/completions") {
		http.Error(w, `{"error":{"message":"not found"}}`, http.StatusNotFound)
		return
	}
	var body map[string]any
	_ = json.NewDecoder(r.Body).Decode(&body)
	f.mu.Lock()
	f.bodies = append(f.bodies, body)
	f.headers = append(f.headers, r.Header.Clone())
	f.arrived = append(f.arrived, time.Now())
	f.mu.Unlock()
	if onConn > 1 && f.hangupReused.Add(-1) >= 0 {
		if nc, _, err := http.NewResponseController(w).Hijack(); err == nil {
			nc.Close()
		}
		return
	}
	if f.failN.Load() > 0 {
		f.failN.Add(-1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(int(f.failWith.Load()))
		fmt.Fprintf(w, `{"error":{"message":"injected %d","type":"fake","code":%d}}`, f.failWith.Load(), f.failWith.Load())
		return
	}
	chat := r.URL.Path == "/v1/chat/completions"
	kv, _ := body["kv_transfer_params"].(map[string]any)
	if kv != nil && kv["do_remote_decode"] == true {
		if !sleepCtx(r, f.prefillDelay) {
			return
		}
		f.prefill(w, kv, chat)
		return
	}
	if stream, _ := body["stream"].(bool); stream {
		if !sleepCtx(r, f.headerDelay) {
			return
		}
		f.stream(w, r, body, chat)
		return
	}
	text := ""
	for _, t := range f.tokens {
		text += t
	}
	w.Header().Set("Content-Type", "application/json")
	choice := map[string]any{"index": 0, "text": text, "finish_reason": "length"}
	if chat {
		choice = map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": text}, "finish_reason": "length"}
	}
	_ = json.NewEncoder(w).Encode(map[string]any{"id": "cmpl-d", "object": "text_completion", "choices": []any{choice},
		"usage": map[string]any{"prompt_tokens": 5, "completion_tokens": len(f.tokens)}})
}

func (f *fakeVLLM) postReady(kv map[string]any) {
	report := map[string]any{"transfer_id": kv["pegaflow_transfer_id"], "token": kv["pegaflow_ready_token"], "status": f.readyState}
	if f.readySource != "" {
		report["source_engine"] = f.readySource
	}
	rep, _ := json.Marshal(report)
	url, _ := kv["pegaflow_ready_url"].(string)
	f.readySent.Store(time.Now().UnixNano())
	resp, err := http.Post(url, "application/json", bytes.NewReader(rep))
	if err == nil {
		resp.Body.Close()
	}
}

func (f *fakeVLLM) prefill(w http.ResponseWriter, kv map[string]any, chat bool) {
	if f.readyState != "none" && f.readyDelay < 0 {
		f.postReady(kv)
	}
	w.Header().Set("Content-Type", "application/json")
	choice := map[string]any{"index": 0, "text": "Hello", "finish_reason": "length"}
	if chat {
		choice = map[string]any{"index": 0, "message": map[string]any{"role": "assistant", "content": "Hello"}, "finish_reason": "length"}
	}
	answer := map[string]any{"id": "cmpl-p", "choices": []any{choice},
		"kv_transfer_params": map[string]any{"do_remote_prefill": true, "do_remote_decode": false,
			"pegaflow_transfer_id": kv["pegaflow_transfer_id"], "pegaflow_num_blocks": 3}}
	if f.paramsSource != "" {
		answer["kv_transfer_params"].(map[string]any)["pegaflow_source_engine"] = f.paramsSource
	}
	switch f.rawParams {
	case "":
	case "-":
		delete(answer, "kv_transfer_params")
	default:
		answer["kv_transfer_params"] = json.RawMessage(f.rawParams)
	}
	_ = json.NewEncoder(w).Encode(answer)
	if f.readyState != "none" && f.readyDelay >= 0 {
		go func() {
			time.Sleep(f.readyDelay)
			f.postReady(kv)
		}()
	}
}

func (f *fakeVLLM) stream(w http.ResponseWriter, r *http.Request, body map[string]any, chat bool) {
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	if f.stallFirst > 0 {
		w.WriteHeader(http.StatusOK)
		fl.Flush()
		if !sleepCtx(r, f.stallFirst) {
			return
		}
	}
	if f.flood > 0 {
		event := []byte("data: {\"choices\":[{\"index\":0,\"text\":\"" + strings.Repeat("x", f.flood) + "\"}]}\n\n")
		for {
			if _, err := w.Write(event); err != nil || r.Context().Err() != nil {
				f.floodCut.Store(true)
				return
			}
			fl.Flush()
		}
	}
	for i, tok := range f.tokens {
		if r.Context().Err() != nil {
			return // the router cancelled the leg
		}
		if f.breakAfter > 0 && i == f.breakAfter {
			hj, _ := w.(http.Hijacker)
			conn, _, err := hj.Hijack()
			if err == nil {
				conn.Close()
			}
			return
		}
		var chunk map[string]any
		if chat {
			chunk = map[string]any{"id": "chat-d", "object": "chat.completion.chunk", "choices": []any{map[string]any{"index": 0, "delta": map[string]any{"content": tok}}}}
		} else {
			chunk = map[string]any{"id": "cmpl-d", "object": "text_completion", "choices": []any{map[string]any{"index": 0, "text": tok}}}
		}
		data, _ := json.Marshal(chunk)
		fmt.Fprintf(w, "data: %s\n\n", data)
		fl.Flush()
		time.Sleep(f.gap)
	}
	if f.errorEvent != "" {
		fmt.Fprintf(w, "data: %s\n\n", f.errorEvent)
	}
	if so, ok := body["stream_options"].(map[string]any); ok && so["include_usage"] == true {
		fmt.Fprintf(w, "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":%d}}\n\n", len(f.tokens))
	}
	fmt.Fprint(w, "data: [DONE]\n\n")
	fl.Flush()
}

// sleepCtx sleeps for d unless the request is cancelled first (false).
func sleepCtx(r *http.Request, d time.Duration) bool {
	if d <= 0 {
		return true
	}
	select {
	case <-time.After(d):
		return true
	case <-r.Context().Done():
		return false
	}
}

// fakeTokens is the fake's tokenizer: one id per byte.
func fakeTokens(text string) []uint32 {
	ids := make([]uint32, len(text))
	for i := range len(text) {
		ids[i] = uint32(text[i])
	}
	return ids
}

// fakeChatText is the fake's chat template.
func fakeChatText(messages []map[string]any, addGenerationPrompt bool) string {
	var b strings.Builder
	for _, m := range messages {
		fmt.Fprintf(&b, "%v:%v\n", m["role"], m["content"])
	}
	if addGenerationPrompt {
		b.WriteString("assistant:")
	}
	return b.String()
}

func (f *fakeVLLM) tokenize(w http.ResponseWriter, r *http.Request) {
	f.tokenizeCalls.Add(1)
	if !sleepCtx(r, f.tokenizeDelay) {
		return
	}
	w.Header().Set("Content-Type", "application/json")
	switch {
	case f.tokenizeFlood:
		fmt.Fprint(w, `{"tokens":[1`)
		chunk := []byte(strings.Repeat(",12345", 10000))
		for r.Context().Err() == nil {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
		return
	case f.tokenizeRaw != "" || f.tokenizeStatus != 0:
		if f.tokenizeStatus != 0 {
			w.WriteHeader(f.tokenizeStatus)
		}
		fmt.Fprint(w, f.tokenizeRaw)
		return
	}
	var req struct {
		Prompt              string           `json:"prompt"`
		Messages            []map[string]any `json:"messages"`
		AddGenerationPrompt bool             `json:"add_generation_prompt"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	text := req.Prompt
	if req.Messages != nil {
		text = fakeChatText(req.Messages, req.AddGenerationPrompt)
	}
	ids := fakeTokens(text)
	_ = json.NewEncoder(w).Encode(map[string]any{"tokens": ids, "count": len(ids), "max_model_len": 1 << 20})
}
