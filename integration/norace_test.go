//go:build !race

package integration

// raceEnabled reports whether the tests run with -race; the dealbridge
// binary is then built with -race too.
const raceEnabled = false
