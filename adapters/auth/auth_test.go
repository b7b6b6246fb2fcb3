package auth

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestPasswordHash(t *testing.T) {
	h, err := HashPassword("correct horse battery staple")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(h, "$argon2id$v=19$m=19456,t=2,p=1$") {
		t.Errorf("hash %q", h)
	}
	if !VerifyPassword(h, "correct horse battery staple") || VerifyPassword(h, "correct horse battery stapl") {
		t.Error("verify")
	}
	h2, _ := HashPassword("correct horse battery staple")
	if h2 == h {
		t.Error("no salt")
	}
	for _, bad := range []string{"", "$argon2id$", "$bcrypt$x$y$z$w", strings.Replace(h, "m=19456", "m=999999999", 1)} {
		if VerifyPassword(bad, "x") {
			t.Errorf("verified against %q", bad)
		}
	}
	if _, err := HashPassword("short"); err == nil {
		t.Error("short password accepted")
	}
	if len(GeneratePassword()) < 20 {
		t.Error("generated password too short")
	}
}

func TestLimiter(t *testing.T) {
	now := time.Unix(0, 0)
	l := newLimiter(2, time.Second)
	l.now = func() time.Time { return now }
	if l.take("a", "u") != 0 || l.take("a", "u") != 0 {
		t.Fatal("burst refused")
	}
	if l.take("a", "v") == 0 {
		t.Fatal("address over its burst allowed")
	}
	if l.take("b", "u") == 0 {
		t.Fatal("user over its burst allowed")
	}
	now = now.Add(time.Second)
	if l.take("a", "u") != 0 {
		t.Fatal("refill not applied")
	}
}

func TestMask(t *testing.T) {
	in := `{"customer":{"id":"C-1","name":"Globex"},"total":"990.00","n":12345678901234567890,"lines":[{"sku":"SKU-1"}]}`
	out := string(MaskJSON(json.RawMessage(in)))
	if strings.Contains(out, "Globex") || strings.Contains(out, `"C-1"`) || !strings.Contains(out, "12345678901234567890") ||
		!strings.Contains(out, "SKU-1") || !strings.Contains(out, "990.00") {
		t.Errorf("masked %s", out)
	}
	patch := `[{"op":"replace","path":"/customer/id","value":"C-42"},{"op":"replace","path":"/total","value":"980.00"}]`
	if out := string(MaskJSON(json.RawMessage(patch))); strings.Contains(out, "C-42") || !strings.Contains(out, "980.00") {
		t.Errorf("masked patch %s", out)
	}
	if got := MaskText("unknown customer C-REJECT (Initech)", CustomerValues(json.RawMessage(`{"customer":{"id":"C-REJECT","name":"Initech"}}`))...); strings.Contains(got, "REJECT") || strings.Contains(got, "Initech") {
		t.Errorf("masked text %q", got)
	}
	if !RoleAdmin.AtLeast(RoleOperator) || RoleViewer.AtLeast(RoleOperator) || RoleNone.AtLeast(RoleViewer) {
		t.Error("role order")
	}
}
