package sim

import (
	"bytes"
	"encoding/json"
	"net/http"

	"github.com/labstack/echo/v4"
)

// POST /tokenize, as vLLM serves it (vllm/entrypoints/serve/tokenize):
// a completion prompt {"prompt": "..."} or a chat {"messages": [...],
// "add_generation_prompt", "continue_final_message"} rendered exactly as
// the sim renders its chat completions, so a router that tokenizes here
// (--lb kv) hashes the very ids the sim will see. add_special_tokens is
// accepted and changes nothing: the sim's tokenizer has no BOS.

type tokenizeRequest struct {
	Model           string        `json:"model"`
	Prompt          *string       `json:"prompt"`
	Messages        []chatMessage `json:"messages"`
	ReturnTokenStrs bool          `json:"return_token_strs"`
	AddSpecial      *bool         `json:"add_special_tokens"`
	chatOptions
}

type tokenizeResponse struct {
	Count       int      `json:"count"`
	MaxModelLen int      `json:"max_model_len"`
	Tokens      []uint32 `json:"tokens"`
	TokenStrs   []string `json:"token_strs"` // null unless return_token_strs, as vLLM
}

func (s *Sim) serveTokenize(c echo.Context) error {
	resp, err := s.tokenize(c)
	if err != nil {
		return s.fail(c, err)
	}
	return c.JSON(http.StatusOK, resp)
}

func (s *Sim) tokenize(c echo.Context) (*tokenizeResponse, error) {
	body, err := readBody(c)
	if err != nil {
		return nil, err
	}
	var r tokenizeRequest
	if err := json.NewDecoder(bytes.NewReader(body)).Decode(&r); err != nil {
		return nil, badRequest("invalid JSON body: %v", err)
	}
	if err := s.checkModel(r.Model); err != nil {
		return nil, err
	}
	resp := &tokenizeResponse{MaxModelLen: s.cfg.MaxModelLen}
	switch {
	case r.Prompt != nil && r.Messages != nil:
		return nil, badRequest("give either prompt or messages, not both")
	case r.Prompt != nil:
		resp.Tokens = s.tok.Encode(*r.Prompt)
		if r.ReturnTokenStrs {
			resp.TokenStrs = TokenStrings(nil, *r.Prompt, false)
		}
	default:
		msgs, ids, gen, err := s.renderChat(r.Messages, r.chatOptions)
		if err != nil {
			return nil, err
		}
		resp.Tokens = ids
		if r.ReturnTokenStrs {
			resp.TokenStrs = TokenStrings(msgs, "", gen)
		}
	}
	if resp.Tokens == nil {
		resp.Tokens = []uint32{}
	}
	resp.Count = len(resp.Tokens)
	return resp, nil
}
