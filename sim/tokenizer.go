package sim

import (
	"fmt"
	"hash/fnv"
	"strings"
)

// Special token ids. Word ids start at numSpecial.
const (
	tokSystem uint32 = iota + 1
	tokUser
	tokAssistant
	tokTool
	tokDeveloper
	numSpecial = 8
)

// MinVocabSize leaves room for the special tokens and some words.
const MinVocabSize = 64

// Tokenizer maps whitespace-separated words to token ids by a stable hash
// (FNV-1a 64 modulo the vocabulary), so every process given the same
// vocabulary size agrees on the ids, and an N-word prompt is N tokens.
type Tokenizer struct {
	vocab uint64
}

// NewTokenizer returns a tokenizer with vocabSize ids (>= MinVocabSize).
func NewTokenizer(vocabSize int) (*Tokenizer, error) {
	if vocabSize < MinVocabSize {
		return nil, fmt.Errorf("vocab size %d: want at least %d", vocabSize, MinVocabSize)
	}
	return &Tokenizer{vocab: uint64(vocabSize)}, nil
}

// Word returns the id of one word.
func (t *Tokenizer) Word(w string) uint32 {
	h := fnv.New64a()
	h.Write([]byte(w))
	return uint32(numSpecial + h.Sum64()%(t.vocab-numSpecial))
}

// Encode tokenizes text: one id per whitespace-separated word.
func (t *Tokenizer) Encode(text string) []uint32 {
	fields := strings.Fields(text)
	out := make([]uint32, len(fields))
	for i, w := range fields {
		out[i] = t.Word(w)
	}
	return out
}

// Message is one chat message.
type Message struct {
	Role    string
	Content string
}

var roleTokens = map[string]uint32{
	"system": tokSystem, "user": tokUser, "assistant": tokAssistant, "tool": tokTool, "developer": tokDeveloper,
}

// ApplyChatTemplate tokenizes messages as [role] content..., followed by
// the assistant marker that opens the reply when genPrompt (vLLM's
// add_generation_prompt). The template has no end-of-message token, so a
// reply's tokens followed by the next message render exactly as the reply
// was generated: turn N+1's prompt extends turn N's prompt and answer.
func (t *Tokenizer) ApplyChatTemplate(msgs []Message, genPrompt bool) ([]uint32, error) {
	var out []uint32
	for i, m := range msgs {
		role, ok := roleTokens[m.Role]
		if !ok {
			return nil, fmt.Errorf("messages[%d]: unknown role %q", i, m.Role)
		}
		out = append(out, role)
		out = append(out, t.Encode(m.Content)...)
	}
	if genPrompt {
		out = append(out, tokAssistant)
	}
	return out, nil
}

// TokenStrings are the texts of chat-rendered or encoded tokens (vLLM's
// token_strs): a word, or a role marker "<|role|>".
func TokenStrings(msgs []Message, text string, genPrompt bool) []string {
	if msgs == nil {
		return strings.Fields(text)
	}
	var out []string
	for _, m := range msgs {
		out = append(out, "<|"+m.Role+"|>")
		out = append(out, strings.Fields(m.Content)...)
	}
	if genPrompt {
		out = append(out, "<|assistant|>")
	}
	return out
}

// Sampler produces the output text: token k of a reply is a function of the
// prompt's tokens, the request's sampling seed and k only, so the same
// prompt gives the same text on any instance and in any role (a P/D pair
// and an aggregated instance agree).
type Sampler struct {
	tok *Tokenizer
}

// Digest condenses a prompt and seed into the sampler's state.
func Digest(prompt []uint32, seed int64) uint64 {
	h := uint64(0x9e3779b97f4a7c15) ^ uint64(seed)
	for _, t := range prompt {
		h = mix64(h ^ uint64(t))
	}
	return mix64(h ^ uint64(len(prompt)))
}

var (
	onsets = []string{"b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "ch", "sh"}
	nuclei = []string{"a", "e", "i", "o", "u", "ai", "ou", "ea"}
)

// Token returns output token k's text (with its leading space) and id.
func (s Sampler) Token(digest uint64, k int) (string, uint32) {
	x := mix64(digest + uint64(k+1)*0x9e3779b97f4a7c15)
	syll := 1 + int(x%3)
	x /= 3
	var b strings.Builder
	b.WriteByte(' ')
	for i := 0; i < syll; i++ {
		b.WriteString(onsets[x%uint64(len(onsets))])
		x /= uint64(len(onsets))
		b.WriteString(nuclei[x%uint64(len(nuclei))])
		x /= uint64(len(nuclei))
	}
	word := b.String()
	return word, s.tok.Word(word[1:])
}

// mix64 is SplitMix64's finalizer: a cheap, well-distributed 64-bit mix.
func mix64(z uint64) uint64 {
	z ^= z >> 30
	z *= 0xbf58476d1ce4e5b9
	z ^= z >> 27
	z *= 0x94d049bb133111eb
	z ^= z >> 31
	return z
}
