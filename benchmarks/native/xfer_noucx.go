//go:build noucx

package main

import "errors"

type xferResult struct{}

func runXfer(uint64, int) ([]xferResult, error) {
	return nil, errors.New("-xfer needs the UCX transfer component (built without the noucx tag)")
}

func printXfer([]xferResult, int) {}

type ucxGetResult struct{}

var errNoUCX = errors.New("needs UCX (built without the noucx tag)")

func runUCXGetTarget(uint64) error { return errNoUCX }

func runUCXGetInitiator(uint64, uint64, int, int) (ucxGetResult, error) {
	return ucxGetResult{}, errNoUCX
}
