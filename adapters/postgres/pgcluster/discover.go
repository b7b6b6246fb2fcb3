package pgcluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// ErrNoPostgres means no PostgreSQL server could be provided: no server
// binaries on the machine (and, for Open, no Docker engine either).
var ErrNoPostgres = errors.New("no PostgreSQL server available")

// debianBinGlob is where Debian and Ubuntu install each major version's
// server binaries, off PATH.
const debianBinGlob = "/usr/lib/postgresql/*/bin"

// discoverBinDir finds the directory holding initdb and pg_ctl: pg_config
// --bindir, then PATH, then the newest /usr/lib/postgresql/*/bin.
func discoverBinDir(ctx context.Context) (string, error) {
	return discover(ctx, os.Getenv("PATH"), debianBinGlob)
}

// discover searches pathList (a PATH value) for pg_config, then for
// initdb, then the directories matching glob.
func discover(ctx context.Context, pathList, glob string) (string, error) {
	var looked []string
	if pgConfig, ok := lookPath(pathList, "pg_config"); ok {
		out, err := exec.CommandContext(ctx, pgConfig, "--bindir").Output()
		if err == nil {
			dir := strings.TrimSpace(string(out))
			if checkBinDir(dir) == nil {
				return dir, nil
			}
			looked = append(looked, dir+" (pg_config --bindir)")
		}
	}
	if initdb, ok := lookPath(pathList, "initdb"); ok {
		if resolved, err := filepath.EvalSymlinks(initdb); err == nil {
			initdb = resolved
		}
		if dir := filepath.Dir(initdb); checkBinDir(dir) == nil {
			return dir, nil
		}
	}
	looked = append(looked, "PATH")
	dirs, _ := filepath.Glob(glob)
	slices.SortFunc(dirs, func(a, b string) int { return majorVersion(b) - majorVersion(a) }) // newest first
	for _, dir := range dirs {
		if checkBinDir(dir) == nil {
			return dir, nil
		}
	}
	looked = append(looked, glob)
	return "", fmt.Errorf("%w: no PostgreSQL server binaries (initdb, pg_ctl) found in %s: install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or set Config.BinDir",
		ErrNoPostgres, strings.Join(looked, ", "))
}

// majorVersion extracts 15 from /usr/lib/postgresql/15/bin.
func majorVersion(binDir string) int {
	v, err := strconv.ParseFloat(filepath.Base(filepath.Dir(binDir)), 64)
	if err != nil {
		return -1
	}
	return int(v * 10)
}

// checkBinDir verifies that dir holds the server binaries Start runs.
func checkBinDir(dir string) error {
	for _, name := range []string{"initdb", "pg_ctl", "postgres"} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			return fmt.Errorf("%s: %w", dir, err)
		}
		if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
			return fmt.Errorf("%s is not executable", filepath.Join(dir, name))
		}
	}
	return nil
}

// lookPath finds an executable named name in pathList.
func lookPath(pathList, name string) (string, bool) {
	for _, dir := range filepath.SplitList(pathList) {
		if dir == "" {
			continue
		}
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode().Perm()&0o111 != 0 {
			return p, true
		}
	}
	return "", false
}
