package bench

import (
	"math"
	"math/rand/v2"
	"strings"
)

// Prompt is one benchmark request's input.
type Prompt struct {
	// Text is sent as the completion prompt or as the user message.
	Text string `json:"-"`
	// InputLen is the nominal prompt length in tokens (words); the server's
	// usage.prompt_tokens replaces it in the results when reported.
	InputLen int `json:"input_len"`
	// OutputLen is sent as max_tokens (and min_tokens with IgnoreEOS).
	OutputLen int `json:"output_len"`
	// Messages, when non-nil, are sent instead of Text (a chat's turn).
	Messages []ChatMessage `json:"-"`
}

// words are short, common English words: most tokenizers (BPE with a
// leading space) map each to a single token, so an N-word prompt counts
// roughly N tokens everywhere, and exactly N in `pegaflow sim`.
var words = strings.Fields(`the of and to in is was for on are with as by at be this
have from or one had not but what all were when we there can an your which their said
if do will each about how up out them then she many some so these would other into has
more her two like him see time could no make than first been its who now people my made
over did down only way find use may water long little very after words called just where
most know get through back much go good new write our me man too any day same right look
think also around another came come work three word must because does part even place well
such here take why things help put years different away again off went old number great
tell men say small every found still between name should home big give air line set own
under read last never us left end along while might next sound below saw something thought
both few those always looked show large often together asked house world going want school
important until form food keep children feet land side without boy once animals life enough
took sometimes four head above kind began almost live page got earth need far hand high year
mother light parts country father let night following picture being study second eyes soon
times story boys since white days ever paper hard near sentence better best across during
today others however sure means knew try told young miles sun ways thing whole hear example
heard several change answer room sea against top turned learn point city play toward five
using himself usually`)

// RandomDataset draws n prompts the way vLLM's random dataset does: input
// and output lengths uniform in [len*(1-ratio), len*(1+ratio)] (output at
// least 1), prompts of random words preceded by a shared prefix of
// prefixLen words. The same seed gives the same prompts.
func RandomDataset(n, inputLen, outputLen, prefixLen int, rangeRatio float64, seed int64) []Prompt {
	r := rand.New(rand.NewPCG(uint64(seed), 0x5eed_da7a))
	prefix := randomWords(r, prefixLen)
	inLo, inHi := lenRange(inputLen, rangeRatio)
	outLo, outHi := lenRange(outputLen, rangeRatio)
	out := make([]Prompt, n)
	for i := range out {
		in := inLo + r.IntN(inHi-inLo+1)
		o := max(outLo+r.IntN(outHi-outLo+1), 1)
		var text string
		switch {
		case prefix == "":
			text = randomWords(r, in)
		case in == 0:
			text = prefix
		default:
			text = prefix + " " + randomWords(r, in)
		}
		out[i] = Prompt{Text: text, InputLen: prefixLen + in, OutputLen: o}
	}
	return out
}

func lenRange(n int, ratio float64) (int, int) {
	lo := int(math.Floor(float64(n) * (1 - ratio)))
	hi := int(math.Floor(float64(n) * (1 + ratio)))
	return max(lo, 0), max(hi, lo, 0)
}

func randomWords(r *rand.Rand, n int) string {
	if n <= 0 {
		return ""
	}
	var b strings.Builder
	for i := 0; i < n; i++ {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(words[r.IntN(len(words))])
	}
	return b.String()
}
