package engine

import "errors"

// Error kinds. Every error the engine returns wraps exactly one of these, so
// the API layer can map it to a status code with errors.Is.
var (
	// ErrInvalid: the request is malformed (bad ids, lengths, layouts).
	ErrInvalid = errors.New("invalid argument")
	// ErrNotFound: an unknown session, instance, namespace or lease.
	ErrNotFound = errors.New("not found")
	// ErrPermission: the caller may not use what it named, e.g. a
	// shared-memory file it does not own.
	ErrPermission = errors.New("permission denied")
	// ErrPrecondition: the request is well formed but conflicts with state,
	// e.g. a hash-seed or geometry mismatch within a namespace.
	ErrPrecondition = errors.New("failed precondition")
	// ErrAlreadyExists: another live session holds what the request names,
	// e.g. an (instance, rank) registration.
	ErrAlreadyExists = errors.New("already exists")
	// ErrExhausted: the pool has no evictable space left.
	ErrExhausted = errors.New("resource exhausted")
	// ErrClosed: the engine is shutting down.
	ErrClosed = errors.New("engine closed")
	// ErrTransferFailed: a transfer settled without all of its blocks.
	ErrTransferFailed = errors.New("transfer failed")
)

// isEngineError reports whether err already wraps one of the kinds above.
func isEngineError(err error) bool {
	for _, kind := range []error{ErrInvalid, ErrNotFound, ErrPermission, ErrPrecondition, ErrAlreadyExists, ErrExhausted, ErrClosed} {
		if errors.Is(err, kind) {
			return true
		}
	}
	return false
}
