package engine

import "errors"

// Error kinds. Every error the engine returns wraps exactly one of these, so
// the API layer can map it to a status code with errors.Is.
var (
	// ErrInvalid: the request is malformed (bad ids, lengths, layouts).
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: an unknown session, instance, namespace or lease.
	ErrNotFound = errors.New("not found")
	// ErrPrecondition: the request is well formed but conflicts with state,
	// e.g. a hash-seed or geometry mismatch within a namespace.
	ErrPrecondition = errors.New("failed precondition")
	// ErrExhausted: the pool has no evictable space left.
	ErrExhausted = errors.New("resource exhausted")
	// ErrClosed: the engine is shutting down.
	ErrClosed = errors.New("engine closed")
	// ErrTransferFailed: a transfer settled without all of its blocks.
	ErrTransferFailed = errors.New("transfer failed")
)
