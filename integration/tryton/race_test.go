//go:build race

package tryton_test

const raceEnabled = true
