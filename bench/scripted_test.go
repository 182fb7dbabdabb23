package bench

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// step is one scripted action of the fake server: wait, then send a chunk.
type step struct {
	wait  time.Duration
	text  string // text (completions) or delta.content (chat); "" sends a role/empty chunk
	usage *[2]int
	raw   string // sent verbatim as an SSE data payload when set
}

// script is how the fake server answers one request.
type script struct {
	status int    // non-200: reply with this status and a JSON error
	steps  []step // streamed in order
	done   bool   // end with data: [DONE]
	abort  bool   // kill the connection after the steps
	hang   bool   // never answer (until the client goes away)
}

// scriptedServer is a loopback OpenAI-style server that answers each request
// by the script named by its prompt (or user message), with chunk timings
// exactly as scripted. It speaks the real SSE format.
type scriptedServer struct {
	*httptest.Server
	t        *testing.T
	scripts  map[string]script
	mu       sync.Mutex
	bodies   []map[string]any
	inflight atomic.Int32
	maxIn    atomic.Int32
}

func newScripted(t *testing.T, scripts map[string]script) *scriptedServer {
	s := &scriptedServer{t: t, scripts: scripts}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprint(w, `{"object":"list","data":[{"id":"sim-model","object":"model"},{"id":"other"}]}`)
	})
	mux.HandleFunc("POST /v1/completions", s.serve)
	mux.HandleFunc("POST /v1/chat/completions", s.serve)
	s.Server = httptest.NewServer(mux)
	t.Cleanup(s.Close)
	return s
}

func (s *scriptedServer) serve(w http.ResponseWriter, r *http.Request) {
	n := s.inflight.Add(1)
	defer s.inflight.Add(-1)
	for {
		m := s.maxIn.Load()
		if n <= m || s.maxIn.CompareAndSwap(m, n) {
			break
		}
	}
	var body map[string]any
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	s.bodies = append(s.bodies, body)
	s.mu.Unlock()
	chat := r.URL.Path == EndpointChat
	key, _ := body["prompt"].(string)
	if chat {
		key = body["messages"].([]any)[0].(map[string]any)["content"].(string)
	}
	sc, ok := s.scripts[key]
	if !ok {
		sc = s.scripts["*"]
	}
	if sc.hang {
		<-r.Context().Done()
		return
	}
	if sc.status != 0 && sc.status != http.StatusOK {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(sc.status)
		fmt.Fprintf(w, `{"error":{"message":"scripted failure %d","type":"server_error","code":%d}}`, sc.status, sc.status)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	fl := w.(http.Flusher)
	fl.Flush()
	start := time.Now()
	var at time.Duration
	for _, st := range sc.steps {
		// Waits are relative to the previous step's scheduled time, so
		// chunk times don't drift by the cost of writing.
		at += st.wait
		time.Sleep(time.Until(start.Add(at)))
		var payload string
		switch {
		case st.raw != "":
			payload = st.raw
		case st.usage != nil:
			payload = fmt.Sprintf(`{"id":"x","choices":[],"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}`,
				st.usage[0], st.usage[1], st.usage[0]+st.usage[1])
		case chat:
			payload = fmt.Sprintf(`{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":%q},"finish_reason":null}]}`, st.text)
		default:
			payload = fmt.Sprintf(`{"id":"x","object":"text_completion","choices":[{"index":0,"text":%q,"finish_reason":null}]}`, st.text)
		}
		fmt.Fprintf(w, "data: %s\n\n", payload)
		fl.Flush()
	}
	if sc.abort {
		panic(http.ErrAbortHandler)
	}
	if sc.done {
		fmt.Fprint(w, "data: [DONE]\n\n")
	}
}

func (s *scriptedServer) requestBodies() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]map[string]any(nil), s.bodies...)
}

func usage(p, c int) *[2]int { return &[2]int{p, c} }
