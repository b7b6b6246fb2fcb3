package metrics_test

import (
	"testing"

	"github.com/dealbridge/dealbridge/adapters/postgres/pgtest"
)

func TestMain(m *testing.M) { pgtest.Main(m) }
