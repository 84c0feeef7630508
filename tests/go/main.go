// ollamarender renders an Ollama TEMPLATE for a chat request the way Ollama's /api/chat does, for
// tests/test_ollama.py (standard library only, built once per test session).
//
// Input (stdin): {"template": "...", "messages": [{"role": ..., "content": ...}], "system": "..."} prints the
// rendering; a JSON array of such objects prints a JSON array of {"text": ...} or {"error": ...}.
//
// What it reproduces of Ollama (github.com/ollama/ollama; read, not copied):
//   - server/routes.go ChatHandler: the Modelfile's SYSTEM becomes a first system message when the request's
//     first message is not a system message;
//   - template/template.go Execute and collate: consecutive messages of one role are merged with "\n\n"; the
//     template sees .Messages (Role, Content), .System (every system message joined with "\n\n") and an empty
//     .Response; it is parsed with Option("missingkey=zero") and a FuncMap whose only entries (json,
//     currentDate, ...) loraft's templates do not use, so none is given here: a template calling anything but
//     Go's builtins fails to parse, as it would not work in Ollama;
//   - template/template.go Identifiers: a {{template "name"}} call without an argument is refused.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
	System   string    `json:"system"`
}

type result struct {
	Text  *string `json:"text,omitempty"`
	Error string  `json:"error,omitempty"`
}

func render(req request) (string, error) {
	messages := req.Messages
	if req.System != "" && (len(messages) == 0 || messages[0].Role != "system") {
		messages = append([]message{{Role: "system", Content: req.System}}, messages...)
	}
	var systems []string
	var merged []*message
	for i := range messages {
		m := messages[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(merged); n > 0 && merged[n-1].Role == m.Role && m.Role != "tool" {
			merged[n-1].Content += "\n\n" + m.Content
		} else {
			merged = append(merged, &m)
		}
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(req.Template)
	if err != nil {
		return "", err
	}
	for _, t := range tmpl.Templates() {
		if t.Tree != nil && callsWithoutArgument(t.Tree.Root) {
			return "", errors.New("undefined template specified")
		}
	}
	var out strings.Builder
	err = tmpl.Execute(&out, map[string]any{
		"System": strings.Join(systems, "\n\n"), "Messages": merged, "Response": "",
	})
	return out.String(), err
}

// callsWithoutArgument reports a {{template "name"}} call with no pipeline anywhere under node.
func callsWithoutArgument(node parse.Node) bool {
	switch n := node.(type) {
	case *parse.ListNode:
		if n == nil {
			return false
		}
		for _, child := range n.Nodes {
			if callsWithoutArgument(child) {
				return true
			}
		}
	case *parse.TemplateNode:
		return n.Pipe == nil
	case *parse.IfNode:
		return callsWithoutArgument(n.List) || callsWithoutArgument(n.ElseList)
	case *parse.RangeNode:
		return callsWithoutArgument(n.List) || callsWithoutArgument(n.ElseList)
	case *parse.WithNode:
		return callsWithoutArgument(n.List) || callsWithoutArgument(n.ElseList)
	}
	return false
}

func main() {
	input, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	if trimmed := strings.TrimSpace(string(input)); strings.HasPrefix(trimmed, "[") {
		var requests []request
		if err := json.Unmarshal(input, &requests); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		results := make([]result, len(requests))
		for i, req := range requests {
			if text, err := render(req); err != nil {
				results[i].Error = err.Error()
			} else {
				results[i].Text = &text
			}
		}
		if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		return
	}
	var req request
	if err := json.Unmarshal(input, &req); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	text, err := render(req)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Print(text)
}
