package queue_test

import (
	"testing"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }

// newDatabase returns the URL of a fresh, migrated database (dropped at
// cleanup); tests open their own pools on it with newPool.
func newDatabase(t testing.TB) string { return pgtest.NewDatabase(t) }
